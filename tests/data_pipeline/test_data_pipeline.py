"""`make data`: the data-juicer cleaning stage (data_pipeline), run with the real data-juicer.

Images are generated in tmp_path. Most runs go through ``data_pipeline.__main__.main`` in this
process (data-juicer's start-up is paid once); the CLI error cases and one determinism check
run ``python -m data_pipeline`` in a fresh process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from data_pipeline.__main__ import main as cli_main
from data_pipeline.errors import PipelineError
from data_pipeline.ops.image_hash import dhash_file, hamming, plan_duplicates, sha256_file
from data_pipeline.sources import read_raw
from tests.helpers.cli import run_cli
from tests.helpers.files import SMALL_OK, listing, read_csv, recipe
from tests.helpers.images import add, bomb_png, textured

# ----------------------------------------------------------------------------- helpers


def run_stage(raw: Path, out: Path, *args: str) -> int:
    return cli_main([str(raw), str(out), *args])


DEDUP_SHA = "process:\n  - sdtune_image_deduplicator:\n      method: sha256\n"
DEDUP_DHASH = "process:\n  - sdtune_image_deduplicator:\n      method: dhash\n      max_distance: 4\n"
FULL_RECIPE = Path(__file__).resolve().parents[2] / "data_pipeline" / "recipes" / "full.yaml"

# ----------------------------------------------------------------------------- acceptance

KEPT = {
    "photo_square.png": "一只橘猫坐在窗台上",
    "photo_wide.jpg": "a red car, parked by the sea",
    "rgba.png": "a logo with a transparent background",
    "cmyk.jpg": "青山绿水，远处有一座桥",
    "deep16.png": "a 16-bit grey scan",
    "palette.png": "a palette image",
    "ratio_half.png": "exactly one to two",
    "ratio_two.png": "exactly two to one",
    "exif_rotated.jpg": "a phone photo, rotated by EXIF",
    "sub/dir/nested.png": "嵌套文件夹里的图片",
    "dup_a.png": "the same picture twice",
    "dup_b.png": "the same picture twice, again",
    "nocaption.png": "",  # kept, as kohya does: trains with the empty caption (a warning counts them)
    "blank_caption.png": "",
}
DROPPED = {
    "small.png": "image_shape_filter: 800x1200 is below min 1024x1024",
    "tiny.png": "image_shape_filter: 64x64 is below min 1024x1024",
    "tall.png": "image_aspect_ratio_filter: aspect ratio 0.488 (1024x2100) is outside [0.5, 2.0]",
    "panorama.jpg": "image_aspect_ratio_filter: aspect ratio 2.93 (3000x1024) is outside [0.5, 2.0]",
    "corrupt.png": "pre-check: unreadable image",
    "fake.png": "pre-check: not an image (Pillow cannot identify the file format)",
    "empty.png": "pre-check: zero-byte file",
    "bomb.png": "pre-check: decompression bomb (Image size (400000000 pixels) exceeds limit of",
    "bomb_warning.png": "pre-check: decompression bomb (Image size (95000000 pixels) exceeds limit of",
}


@pytest.fixture(scope="module")
def acceptance_raw(tmp_path_factory) -> Path:
    """About twenty raw files covering every keep and drop case of the default recipe."""
    raw = tmp_path_factory.mktemp("acceptance") / "raw"
    add(raw, "photo_square.png", textured(1, 1024, 1024), KEPT["photo_square.png"], compress_level=1)
    add(raw, "photo_wide.jpg", textured(2, 1280, 1024), KEPT["photo_wide.jpg"], quality=90)
    add(raw, "rgba.png", textured(3, 1100, 1100).convert("RGBA"), KEPT["rgba.png"], compress_level=1)
    add(raw, "cmyk.jpg", textured(4, 1024, 1100).convert("CMYK"), KEPT["cmyk.jpg"])
    deep = (np.asarray(textured(5, 1024, 1024).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    add(raw, "deep16.png", Image.fromarray(deep), KEPT["deep16.png"], compress_level=1)
    add(raw, "palette.png", textured(6, 1024, 1024).convert("P"), KEPT["palette.png"])
    add(raw, "ratio_half.png", textured(7, 1024, 2048).convert("L"), KEPT["ratio_half.png"], compress_level=1)
    add(raw, "ratio_two.png", textured(8, 2048, 1024), KEPT["ratio_two.png"], compress_level=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    add(raw, "exif_rotated.jpg", textured(9, 1200, 1024), KEPT["exif_rotated.jpg"], exif=exif)
    add(raw, "sub/dir/nested.png", textured(10, 1024, 1024), KEPT["sub/dir/nested.png"], compress_level=1)
    add(raw, "dup_a.png", textured(11, 1024, 1024), KEPT["dup_a.png"], compress_level=1)
    add(raw, "dup_b.png", (raw / "dup_a.png").read_bytes(), KEPT["dup_b.png"])

    add(raw, "small.png", textured(12, 800, 1200), "too small")
    add(raw, "tiny.png", textured(13, 64, 64), "a thumbnail")
    add(raw, "tall.png", textured(14, 1024, 2100), "too tall", compress_level=1)
    add(raw, "panorama.jpg", textured(15, 3000, 1024), "a panorama")
    add(raw, "corrupt.png", (raw / "photo_square.png").read_bytes()[:4000], "cut off")
    add(raw, "fake.png", b"this is a text file, not a PNG\n", "fake")
    add(raw, "empty.png", b"", "empty file")
    add(raw, "bomb.png", bomb_png(20000, 20000), "over twice Pillow's limit: an error")
    add(raw, "bomb_warning.png", bomb_png(10000, 9500), "over Pillow's limit: a warning, treated as an error")
    add(raw, "nocaption.png", textured(16, 1024, 1024), None)
    add(raw, "blank_caption.png", textured(17, 1024, 1024), "  \n\t ")
    return raw


@pytest.mark.slow
def test_acceptance_kolors_recipe(acceptance_raw, tmp_path, capsys):
    raw, out = acceptance_raw, tmp_path / "clean"
    before = listing(raw, with_mtime=True)

    assert run_stage(raw, out, "--model", "kolors", "--np", "2") == 0
    printed = capsys.readouterr()
    assert "image_shape_filter" in printed.out and "total" in printed.out
    assert ("warning: 2 of 14 kept images have no caption; they train unconditionally" in printed.err
            and "were dropped" not in printed.err), printed.err  # 9 of 23 dropped: no loud warning

    meta = read_csv(out / "metadata.csv")
    assert [r["file_name"] for r in meta] == sorted(f"images/{k}" for k in KEPT)
    assert {r["file_name"][len("images/") :]: r["text"] for r in meta} == KEPT  # Chinese captions round-trip
    for name in KEPT:  # kept files are byte copies
        assert (out / "images" / name).read_bytes() == (raw / name).read_bytes()

    dropped = {r["file"]: r["reason"] for r in read_csv(out / "dropped.csv")}
    assert set(dropped) == set(DROPPED)
    for name, reason in DROPPED.items():
        assert dropped[name].startswith(reason), (name, dropped[name])

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["counts"] == {"in": len(KEPT) + len(DROPPED), "kept": len(KEPT), "dropped": len(DROPPED), "uncaptioned": 2}
    assert report["dropped_by"]["image_shape_filter"] == 2
    assert report["dropped_by"]["image_aspect_ratio_filter"] == 2
    assert report["operators"] == ["image_shape_filter", "image_aspect_ratio_filter"]
    assert listing(raw, with_mtime=True) == before  # RAW untouched: same files, bytes and mtimes

    # a second run, as `make data` does it (fresh process), replaces OUT with identical bytes
    first = listing(out)
    proc = run_cli(str(raw), str(out), "--model", "kolors", "--np", "2", module="data_pipeline", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert listing(out) == first
    assert listing(raw, with_mtime=True) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".clean.")]  # no leftovers


@pytest.mark.slow
def test_training_reader_accepts_output(acceptance_raw, tmp_path):
    from sdtune.data.images import load_rgb
    from sdtune.data.records import load_records

    out = tmp_path / "clean"
    assert run_stage(acceptance_raw, out, "--model", "kolors", "--np", "1", "--link", "hardlink") == 0
    records = load_records(out)
    assert sorted((r.path.relative_to(out / "images").as_posix(), r.text) for r in records) == sorted(KEPT.items())
    for record in records:  # every kept mode converts to the RGB training reads
        assert load_rgb(record.path).mode == "RGB"
    assert (out / "images" / "rgba.png").stat().st_ino == (acceptance_raw / "rgba.png").stat().st_ino
    # and training runs on it as it is, with no conversion step in between
    proc = run_cli(f"data.root={out}", "experiment=quickstart", "trainer.max_steps=3", "callbacks.samples=null",
                   "data.val_images=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from sdtune.lora.files import read_lora

    assert read_lora(tmp_path / "run" / "lora.safetensors").metadata["ss_num_train_images"] == str(len(KEPT))


# ----------------------------------------------------------------------------- deduplication


def test_plan_duplicates_keeps_first_and_respects_distance():
    base = 0x0F0F_0F0F_0F0F_0F0F
    hashes = [f"{base:016x}", f"{base ^ 0b111:016x}", f"{base ^ 0b11111:016x}", "", f"{base:016x}", "", "ff" * 8]
    assert plan_duplicates(hashes, 0) == {4: (0, 0)}
    # 3 bits off: duplicate; 5 bits off: not; empty hashes never match each other
    assert plan_duplicates(hashes, 4) == {1: (0, 3), 4: (0, 0)}
    assert plan_duplicates(hashes, 5) == {1: (0, 3), 2: (0, 5), 4: (0, 0)}


def test_dhash_sees_near_duplicates_that_sha256_misses(tmp_path):
    original = add(tmp_path, "a.png", textured(1, 640, 480), None)
    resaved = add(tmp_path, "a_resaved.jpg", Image.open(original).convert("RGB"), None, quality=80)
    brighter = add(tmp_path, "a_bright.png", ImageEnhance.Brightness(Image.open(original)).enhance(1.1), None)
    other = add(tmp_path, "b.png", textured(2, 640, 480), None)
    digests = {sha256_file(str(p)) for p in (original, resaved, brighter, other)}
    assert len(digests) == 4  # byte-wise all different
    h = {p.name: dhash_file(str(p)) for p in (original, resaved, brighter, other)}
    assert hamming(h["a.png"], h["a_resaved.jpg"]) <= 2
    assert hamming(h["a.png"], h["a_bright.png"]) <= 2
    assert hamming(h["a.png"], h["b.png"]) > 12


@pytest.mark.slow
def test_dedup_operator_in_a_recipe(tmp_path):
    raw = tmp_path / "raw"
    add(raw, "a.png", textured(1, 256, 256), "first picture")
    add(raw, "b.png", textured(2, 256, 256), "second picture")
    add(raw, "c.png", textured(3, 256, 256), "third picture")
    add(raw, "d.png", textured(4, 256, 256), "fourth picture")
    add(raw, "x_copy_of_a.png", (raw / "a.png").read_bytes(), "exact copy")
    add(raw, "x_resave_of_b.jpg", textured(2, 256, 256), "re-encoded", quality=85)
    add(raw, "x_brighter_c.png", ImageEnhance.Brightness(textured(3, 256, 256)).enhance(1.08), "brighter")

    out = tmp_path / "sha"
    assert run_stage(raw, out, "--recipe", str(recipe(tmp_path, "sha.yaml", DEDUP_SHA)), "--np", "2") == 0
    assert read_csv(out / "dropped.csv") == [
        {"file": "x_copy_of_a.png", "reason": "sdtune_image_deduplicator: duplicate of a.png (identical bytes)"}
    ]

    out = tmp_path / "dhash"
    assert run_stage(raw, out, "--recipe", str(recipe(tmp_path, "dhash.yaml", DEDUP_DHASH)), "--np", "2") == 0
    dropped = {r["file"]: r["reason"] for r in read_csv(out / "dropped.csv")}
    assert set(dropped) == {"x_copy_of_a.png", "x_resave_of_b.jpg", "x_brighter_c.png"}
    assert dropped["x_resave_of_b.jpg"].startswith("sdtune_image_deduplicator: duplicate of b.png (dhash distance")
    assert dropped["x_brighter_c.png"].startswith("sdtune_image_deduplicator: duplicate of c.png (dhash distance")
    assert [r["file_name"] for r in read_csv(out / "metadata.csv")] == [f"images/{n}.png" for n in "abcd"]


@pytest.mark.slow
def test_full_recipe_names_every_operator(tmp_path):
    raw = tmp_path / "raw"
    add(raw, "good.png", textured(1, 1024, 1024), "一只橘猫", compress_level=1)
    add(raw, "good_wide.png", textured(2, 1100, 1024), "a dog on the grass", compress_level=1)
    add(raw, "short_caption.png", textured(3, 1024, 1024), "猫", compress_level=1)
    add(raw, "flat.png", Image.new("RGB", (1024, 1024), (90, 90, 90)), "a flat grey square")
    add(raw, "small.png", textured(4, 800, 800), "a small picture", compress_level=1)
    add(raw, "wide_resaved.jpg", textured(2, 1100, 1024), "the dog again, as JPEG", quality=95)
    assert (raw / "flat.png").stat().st_size < 8 * 1024 < (raw / "wide_resaved.jpg").stat().st_size

    out = tmp_path / "out"
    assert run_stage(raw, out, "--recipe", str(FULL_RECIPE)) == 0
    dropped = {r["file"]: r["reason"] for r in read_csv(out / "dropped.csv")}
    flat_kib = (raw / "flat.png").stat().st_size / 1024
    assert dropped == {
        "short_caption.png": "text_length_filter: caption length 1 is below min 3",
        "flat.png": f"image_size_filter: file size {flat_kib:.1f} KiB is below min 8KB",
        "small.png": "image_shape_filter: 800x800 is below min 1024x1024",
        "wide_resaved.jpg": dropped["wide_resaved.jpg"],
    }
    assert dropped["wide_resaved.jpg"].startswith("sdtune_image_deduplicator: duplicate of good_wide.png (dhash")
    assert [r["file_name"] for r in read_csv(out / "metadata.csv")] == ["images/good.png", "images/good_wide.png"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["dropped_by"] == {
        "text_length_filter": 1,
        "image_size_filter": 1,
        "image_shape_filter": 1,
        "sdtune_image_deduplicator": 1,
    }


# ----------------------------------------------------------------------------- raw input forms


def _forms_raw(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    add(root, "images/a.png", textured(1, 64, 64), None)
    add(root, "images/b.png", textured(2, 64, 64), None)
    return root


def test_metadata_csv_form(tmp_path):
    root = _forms_raw(tmp_path)
    text = 'file_name,text,extra\nimages/a.png,"猫, 白色",x\nimages/gone.png,missing\nimages/b.png,  \nimages/a.png,again\n'
    (root / "metadata.csv").write_text(text, encoding="utf-8-sig")  # a BOM, as Excel writes it
    raw = read_raw(root)
    assert raw.form == "metadata.csv"
    got = [(c.key, c.caption, c.problem and c.problem[0]) for c in raw.candidates]
    assert got == [
        ("images/a.png", "猫, 白色", None),
        ("images/gone.png", "missing", "missing file"),
        ("images/b.png", "", None),  # blank: kept, trains with the empty caption
        ("images/a.png (metadata.csv row 5)", "again", "listed twice"),
    ]
    assert raw.candidates[0].path == root / "images" / "a.png"

    (root / "metadata.csv").write_text("name,caption\nimages/a.png,x\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="has no 'file_name' or 'text' column"):
        read_raw(root)


def test_metadata_jsonl_form(tmp_path):
    root = _forms_raw(tmp_path)
    lines = [json.dumps({"file_name": "images/a.png", "text": "一张图"}, ensure_ascii=False), "{not json", ""]
    lines.append(json.dumps({"file_name": "images/b.png", "text": "second"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = read_raw(root)
    assert raw.form == "metadata.jsonl"
    got = {c.key: (c.caption, c.problem and c.problem[0]) for c in raw.candidates}
    assert got == {
        "images/a.png": ("一张图", None),
        "metadata.jsonl line 2": (None, "bad record"),
        "images/b.png": ("second", None),
    }


def test_metadata_jsonl_holding_data_juicer_rows_is_read_as_such(tmp_path):
    """The seeds' Kolors example writes data-juicer rows ({"text", "image": [path]}) into a file
    named metadata.jsonl: read by content, not by name (before, every row was 'empty file_name')."""
    root = _forms_raw(tmp_path)
    rows = [{"text": "二次元", "image": [str(root / "images" / "a.png")]}, {"text": "b", "image": ["images/b.png"]}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for given in (root, root / "metadata.jsonl"):
        raw = read_raw(given)
        assert raw.form == "data-juicer jsonl"
        assert {c.key: (c.caption, c.problem) for c in raw.candidates} == {"images/a.png": ("二次元", None),
                                                                          "images/b.png": ("b", None)}


def test_sidecar_form_with_subfolders(tmp_path):
    root = tmp_path / "raw"
    add(root, "x/y/a.png", textured(1, 32, 32), "deep caption\n")
    add(root, "b.jpg", textured(2, 32, 32), None)
    add(root, "notes.gif", b"GIF89a", "captioned but not a supported type")
    add(root, ".hidden/c.png", textured(3, 32, 32), "ignored")
    raw = read_raw(root)
    assert raw.form == "sidecar captions"
    got = {c.key: (c.caption, c.problem and c.problem[0]) for c in raw.candidates}
    assert got == {
        "b.jpg": ("", None),  # no sidecar: kept with the empty caption, as kohya does
        "notes.gif": (None, "unsupported file type"),
        "x/y/a.png": ("deep caption", None),
    }


@pytest.mark.slow
def test_data_juicer_jsonl_form_end_to_end(tmp_path):
    root = _forms_raw(tmp_path)
    outside = add(tmp_path / "elsewhere", "far.png", textured(3, 64, 64), None)
    records = [
        {"text": "<__dj__image> 红色的花 <|__dj__eoc|>", "images": ["images/a.png"]},
        {"text": "single path under the key 'image'", "image": "images/b.png"},
        {"text": "an absolute path outside the folder", "images": [str(outside)]},
        {"text": "two images", "images": ["images/a.png", "images/b.png"]},
        {"text": "gone", "images": ["images/missing.png"]},
    ]
    data = root / "dataset.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert read_raw(root).source == data  # a folder holding one jsonl means that jsonl

    out = tmp_path / "out"
    assert run_stage(data, out, "--recipe", str(recipe(tmp_path, "ok.yaml", SMALL_OK)), "--np", "1") == 0
    meta = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    external = [k for k in meta if k.startswith("images/_external/")]
    assert len(external) == 1 and external[0].endswith("/far.png")
    assert meta["images/images/a.png"] == "红色的花"
    assert meta["images/images/b.png"] == "single path under the key 'image'"
    dropped = {r["file"]: r["reason"] for r in read_csv(out / "dropped.csv")}
    assert dropped == {
        "dataset.jsonl line 4": "pre-check: bad record (2 images listed; sdtune trains on exactly one image per caption)",
        "images/missing.png": "pre-check: missing file (listed but not found)",
    }


# ----------------------------------------------------------------------------- OUT safety and CLI errors


def test_refuses_foreign_out_folder_and_out_inside_raw(tmp_path, capsys):
    raw = tmp_path / "raw"
    add(raw, "a.png", textured(1, 64, 64), "a caption")
    out = tmp_path / "mine"
    add(out, "thesis.txt", b"years of work", None)
    before = listing(out, with_mtime=True)
    assert run_stage(raw, out) == 2
    err = capsys.readouterr().err
    assert f"OUT {out} exists, is not empty and was not made by this stage" in err
    assert listing(out, with_mtime=True) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "raw"]  # no temporary folder left

    assert run_stage(raw, raw / "clean") == 2
    assert "overlap; RAW is never written to" in capsys.readouterr().err
    assert not (raw / "clean").exists()


def test_nothing_survives_exits_1_but_reports_why(tmp_path, capsys):
    raw = tmp_path / "raw"
    add(raw, "a.png", b"", "an empty file")
    add(raw, "b.png", textured(1, 64, 64), None)
    out = tmp_path / "out"
    assert run_stage(raw, out) == 1
    assert "no image survived" in capsys.readouterr().err
    assert not out.exists()  # an empty result never takes OUT's place
    assert read_csv(tmp_path / "out.dropped.csv") == [
        {"file": "a.png", "reason": "pre-check: zero-byte file"},
        {"file": "b.png", "reason": "image_shape_filter: 64x64 is below min 512x512"},  # MODEL=sd15, the default
    ]


@pytest.mark.slow  # five data-stage subprocesses, ~10 s
def test_cli_errors_exit_2_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    raw = tmp_path / "raw"
    add(raw, "a.png", textured(1, 64, 64), "a caption")
    bad = recipe(tmp_path, "bad.yaml", "process:\n  - image_shape_filterz:\n      min_width: 10\n")
    out = str(tmp_path / "o")
    cases = [
        ((str(tmp_path / "nope"), out), [f"RAW {tmp_path / 'nope'} does not exist", "accepted layouts"]),
        ((str(empty), out), [f"RAW folder {empty} is empty", "accepted layouts"]),
        (
            (str(raw), out, "--recipe", str(tmp_path / "nope.yaml")),
            [f"recipe file {tmp_path / 'nope.yaml'} does not exist"],
        ),
        (
            (str(raw), out, "--recipe", str(bad)),
            [
                f"recipe {bad} is not valid",
                "Unknown operator 'image_shape_filterz'",
                "did you mean: image_shape_filter",
            ],
        ),
    ]
    for args, messages in cases:
        proc = run_cli(*args, module="data_pipeline", timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        for message in messages:
            assert message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("error:") == 1
        assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "o").exists()


def test_several_captions_per_image_survive_the_stage_as_alternatives(tmp_path):
    """A jsonl text list stays a list (never its string form): OUT gets metadata.jsonl, which
    training reads as alternative captions, one picked per epoch from the sample's seed."""
    from sdtune.data.records import load_records

    root = _forms_raw(tmp_path)
    rows = [{"file_name": "images/a.png", "text": ["一只猫", "a cat on a mat"]}, {"file_name": "images/b.png", "text": "one"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    assert run_stage(root, out, "--recipe", str(recipe(tmp_path, "ok.yaml", SMALL_OK)), "--np", "1") == 0
    assert not (out / "metadata.csv").exists()
    written = [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written == [{"file_name": "images/images/a.png", "text": ["一只猫", "a cat on a mat"]},
                       {"file_name": "images/images/b.png", "text": "one"}]
    records = {r.path.name: r for r in load_records(out)}
    assert records["a.png"].captions == ("一只猫", "a cat on a mat") and records["b.png"].captions == ("one",)
