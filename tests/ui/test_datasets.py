"""The dataset view and the caption write: verdicts from the run's own checks; one caption file
changed atomically, never an image, never a path outside the opened folder."""

from __future__ import annotations

import os
import shutil

from sdtune.utils.io import file_sha256
from tests.helpers.images import add, textured
from tests.helpers.paths import QUICKSTART
from tests.helpers.ui import client, kohya_set


def hashes(root):
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and "outputs" not in p.parts}


def test_the_view_lists_captions_buckets_and_why_an_image_would_be_skipped(tmp_path):
    root = kohya_set(tmp_path / "set", 2)
    (root / "cut.png").write_bytes((root / "img1.png").read_bytes()[:60])  # a PNG cut short
    web = client(tmp_path / "outputs")
    images = {i["file"]: i for i in web.post("/api/dataset", json={"root": str(root), "resolution": 64}).json()["images"]}
    assert images["img0.png"]["caption"] == "caption 0" and images["img1.png"]["caption"] == ""
    assert images["img0.png"]["caption_file"] == "img0.txt" and images["img0.png"]["verdict"] == "ok"
    assert (images["img0.png"]["width"], images["img0.png"]["height"]) == (64, 48)
    assert images["img0.png"]["bucket"] == [64, 64]  # data.bucket_step=64: no side under 64
    assert images["cut.png"]["verdict"] == "skipped" and "truncated" in images["cut.png"]["reason"]
    assert "data.bad_images=skip" in images["cut.png"]["reason"]
    missing = web.post("/api/dataset", json={"root": str(tmp_path / "none")})
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]
    relative = web.post("/api/dataset", json={"root": "set"})
    assert relative.status_code == 400 and "absolute path" in relative.json()["error"]


def test_a_caption_write_changes_only_that_caption_file_atomically(tmp_path):
    root = kohya_set(tmp_path / "set", 2)
    web = client(tmp_path / "outputs")
    web.post("/api/dataset", json={"root": str(root)})
    before = hashes(root)
    answer = web.put("/api/dataset/caption", json={"root": str(root), "file": "img1.png", "caption": "a new caption"})
    assert answer.json() == {"ok": True, "caption_file": "img1.txt"}
    after = hashes(root)
    assert (root / "img1.txt").read_text() == "a new caption"
    assert {k: v for k, v in after.items() if k != "img1.txt"} == before  # the images and img0.txt untouched
    assert sorted(p.name for p in root.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt"]  # no temp file
    view = web.get("/api/dataset", params={"root": str(root)}).json()  # reading a folder opened before
    assert [i["caption"] for i in view["images"]] == ["caption 0", "a new caption"]


def test_a_metadata_caption_is_rewritten_in_its_row_only(tmp_path):
    root = tmp_path / "quick"
    shutil.copytree(QUICKSTART, root)
    web = client(tmp_path / "outputs")
    web.post("/api/dataset", json={"root": str(root)})
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
    web.post("/api/dataset", json={"root": str(root)})
    before = hashes(tmp_path)
    outside = web.put("/api/dataset/caption", json={"root": str(root), "file": "../other/img0.png", "caption": "x"})
    assert outside.status_code == 403 and "outside the dataset folder" in outside.json()["error"]
    caption = web.put("/api/dataset/caption", json={"root": str(root), "file": "img0.txt", "caption": "x"})
    assert caption.status_code == 400 and caption.json()["error"].startswith("'img0.txt' is not an image of the dataset")
    assert hashes(tmp_path) == before


def test_a_metadata_csv_row_is_rewritten_alone_keeping_bom_crlf_and_odd_rows(tmp_path):
    root = tmp_path / "set"
    for i in range(4):
        add(root, f"img{i}.png", textured(i, 32, 32), None)
    rows = ['file_name,text,extra', 'img0.png,"red, round",x', 'img1.png', 'img2.png,old caption,y',
            'img3.png,"a ""quoted"" one",z,']  # a quoted comma, a short row, the target, a long row
    raw = ("\ufeff" + "\r\n".join(rows) + "\r\n").encode()
    (root / "metadata.csv").write_bytes(raw)
    web = client(tmp_path / "outputs")
    assert web.post("/api/dataset", json={"root": str(root)}).status_code == 200
    answer = web.put("/api/dataset/caption", json={"root": str(root), "file": "img2.png", "caption": "new, one"})
    assert answer.json() == {"ok": True, "caption_file": "metadata.csv"}
    assert (root / "metadata.csv").read_bytes() == raw.replace(b"img2.png,old caption,y", b'img2.png,"new, one",y')
    short = web.put("/api/dataset/caption", json={"root": str(root), "file": "img1.png", "caption": "filled"})
    assert short.status_code == 200 and b"\r\nimg1.png,filled\r\n" in (root / "metadata.csv").read_bytes()


def test_caption_writes_refuse_symlinks_and_other_extensions_and_work_under_a_linked_root(tmp_path):
    real = kohya_set(tmp_path / "real", 2)
    (real / "shared.txt").write_text("a shared caption")
    os.symlink("shared.txt", real / "img1.txt")  # inside the folder: the path jail lets it through
    os.symlink(real, tmp_path / "link")
    web = client(tmp_path / "outputs")
    root = str(tmp_path / "link")
    assert web.post("/api/dataset", json={"root": root}).status_code == 200
    written = web.put("/api/dataset/caption", json={"root": root, "file": "img0.png", "caption": "through the link"})
    assert written.json() == {"ok": True, "caption_file": "img0.txt"} and (real / "img0.txt").read_text() == "through the link"
    linked = web.put("/api/dataset/caption", json={"root": root, "file": "img1.png", "caption": "x"})
    assert linked.status_code == 403 and "is a symbolic link" in linked.json()["error"] and "Fix:" in linked.json()["error"]
    assert (real / "img1.txt").is_symlink() and (real / "shared.txt").read_text() == "a shared caption"
    for ext in (".yaml", "json", ".py"):
        bad = web.put("/api/dataset/caption", json={"root": root, "file": "img0.png", "caption": "x",
                                                    "caption_extension": ext})
        assert bad.status_code == 400 and "only .txt or .caption" in bad.json()["error"], ext
    assert sorted(p.name for p in real.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt", "shared.txt"]
    assert web.post("/api/dataset", json={"root": root, "caption_extension": ".yml"}).status_code == 400
    meta = tmp_path / "meta"
    add(meta, "a.png", textured(0, 32, 32), None)
    (meta / "real.csv").write_text("file_name,text\na.png,old\n")
    os.symlink("real.csv", meta / "metadata.csv")
    web.post("/api/dataset", json={"root": str(meta)})
    refused = web.put("/api/dataset/caption", json={"root": str(meta), "file": "a.png", "caption": "new"})
    assert refused.status_code == 403 and "is a symbolic link" in refused.json()["error"]
    assert (meta / "metadata.csv").is_symlink() and (meta / "real.csv").read_text() == "file_name,text\na.png,old\n"
