"""The dataset view and the caption write: verdicts from the run's own checks; one caption file
changed atomically, never an image, never a path outside the opened folder."""

from __future__ import annotations

import shutil

from sdtune.utils.io import file_sha256
from tests.helpers.paths import QUICKSTART
from tests.helpers.ui import client, kohya_set


def hashes(root):
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and "outputs" not in p.parts}


def test_the_view_lists_captions_buckets_and_why_an_image_would_be_skipped(tmp_path):
    root = kohya_set(tmp_path / "set", 2)
    (root / "cut.png").write_bytes((root / "img1.png").read_bytes()[:60])  # a PNG cut short
    web = client(tmp_path / "outputs")
    images = {i["file"]: i for i in web.get("/api/dataset", params={"root": str(root), "resolution": 64}).json()["images"]}
    assert images["img0.png"]["caption"] == "caption 0" and images["img1.png"]["caption"] == ""
    assert images["img0.png"]["caption_file"] == "img0.txt" and images["img0.png"]["verdict"] == "ok"
    assert (images["img0.png"]["width"], images["img0.png"]["height"]) == (64, 48)
    assert images["img0.png"]["bucket"] == [64, 64]  # data.bucket_step=64: no side under 64
    assert images["cut.png"]["verdict"] == "skipped" and "truncated" in images["cut.png"]["reason"]
    assert "data.bad_images=skip" in images["cut.png"]["reason"]
    missing = web.get("/api/dataset", params={"root": str(tmp_path / "none")})
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]
    relative = web.get("/api/dataset", params={"root": "set"})
    assert relative.status_code == 400 and "absolute path" in relative.json()["error"]


def test_a_caption_write_changes_only_that_caption_file_atomically(tmp_path):
    root = kohya_set(tmp_path / "set", 2)
    web = client(tmp_path / "outputs")
    web.get("/api/dataset", params={"root": str(root)})
    before = hashes(root)
    answer = web.put("/api/dataset/caption", json={"root": str(root), "file": "img1.png", "caption": "a new caption"})
    assert answer.json() == {"ok": True, "caption_file": "img1.txt"}
    after = hashes(root)
    assert (root / "img1.txt").read_text() == "a new caption"
    assert {k: v for k, v in after.items() if k != "img1.txt"} == before  # the images and img0.txt untouched
    assert sorted(p.name for p in root.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt"]  # no temp file
    view = web.get("/api/dataset", params={"root": str(root)}).json()
    assert [i["caption"] for i in view["images"]] == ["caption 0", "a new caption"]


def test_a_metadata_caption_is_rewritten_in_its_row_only(tmp_path):
    root = tmp_path / "quick"
    shutil.copytree(QUICKSTART, root)
    web = client(tmp_path / "outputs")
    web.get("/api/dataset", params={"root": str(root)})
    images = {p.name: file_sha256(p) for p in (root / "images").iterdir()}
    lines = (root / "metadata.csv").read_text().splitlines()
    file = lines[2].split(",")[0]
    web.put("/api/dataset/caption", json={"root": str(root), "file": file, "caption": 'red, "round" sks'})
    new = (root / "metadata.csv").read_text().splitlines()
    assert new[2] == f'{file},"red, ""round"" sks"' and new[:2] + new[3:] == lines[:2] + lines[3:]
    assert {p.name: file_sha256(p) for p in (root / "images").iterdir()} == images


def test_a_caption_write_outside_the_root_or_of_no_image_of_the_set_is_refused(tmp_path):
    root = kohya_set(tmp_path / "set", 1)
    kohya_set(tmp_path / "other", 1)
    web = client(tmp_path / "outputs")
    unopened = web.put("/api/dataset/caption", json={"root": str(root), "file": "img0.png", "caption": "x"})
    assert unopened.status_code == 403 and "open it there first" in unopened.json()["error"]
    web.get("/api/dataset", params={"root": str(root)})
    before = hashes(tmp_path)
    outside = web.put("/api/dataset/caption", json={"root": str(root), "file": "../other/img0.png", "caption": "x"})
    assert outside.status_code == 403 and "outside the dataset folder" in outside.json()["error"]
    caption = web.put("/api/dataset/caption", json={"root": str(root), "file": "img0.txt", "caption": "x"})
    assert caption.status_code == 400 and "is not an image of the dataset" in caption.json()["error"]
    assert hashes(tmp_path) == before
