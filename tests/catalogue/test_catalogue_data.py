"""Odd dataset folders and metadata (issue 10): each case gives our DataError naming the file, row,
value and fix before any model loads (or, where documented, works), and never changes a user file.

Runs that should fail point ``model.path`` at a missing folder: if our check did not fire, the
run stops at the model with a different error, in a second, instead of training.
"""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
from PIL import Image, ImageFile

from sdtune.data.datamodule import ImageCaptionDataModule, folder_repeats
from sdtune.data.records import load_records
from sdtune.data.sampler import TrainBatchSampler
from sdtune.run.train import train
from sdtune.utils.errors import ConfigError, DataError, ModelLoadError
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.files import snapshot
from tests.helpers.images import bomb_png
from tests.helpers.paths import QUICKSTART

CAPTIONS = ["a red circle", "a round red shape"]


def _no_model(tmp_path):
    return ["model.tiny=false", f"model.path={tmp_path / 'no-model'}"]


def _train(root_value, tmp_path, *overrides):
    cfg = compose_cfg("experiment=quickstart", f"data.root={root_value}", *_no_model(tmp_path), *overrides,
                      output_dir=tmp_path / "run")
    train(cfg, tmp_path / "run")


def _fails(root, tmp_path, message, *overrides, error=DataError):
    """``train`` stops with ``error`` matching ``message``, and no file under ``root`` changed."""
    before = snapshot(root)
    with pytest.raises(error, match=message):
        _train(root, tmp_path, *overrides)
    assert snapshot(root) == before


def _jsonl(root, *extra_rows, texts=None):
    """Replace metadata.csv by a metadata.jsonl of the four images (captions ``texts``) plus ``extra_rows``."""
    (root / "metadata.csv").unlink()
    texts = texts or [f"caption {i}" for i in range(4)]
    rows = [{"file_name": f"images/{i}.png", "text": t} for i, t in enumerate(texts)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(x + "\n" for x in extra_rows))


def _add_csv_row(root, row):
    with open(root / "metadata.csv", "a") as fh:
        fh.write(row + "\n")


# -- 1. every image is decoded before training --------------------------------------------------

def _cut_jpeg(root):
    buf = io.BytesIO()
    Image.open(root / "images" / "2.png").convert("RGB").save(buf, "JPEG", quality=90)
    (root / "images" / "2.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "images" / "2.png").unlink()
    meta = root / "metadata.csv"
    meta.write_text(meta.read_text().replace("images/2.png", "images/2.jpg"))
    return "2.jpg"


def _cut_png(root):
    img = root / "images" / "2.png"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    return "2.png"


@pytest.mark.parametrize("cut", [_cut_jpeg, _cut_png], ids=["jpeg-cut-in-half", "png-cut-short"])
@pytest.mark.parametrize("truncated_flag", [False, True], ids=["pillow-default", "load-truncated-on"])
def test_cut_off_image_is_an_error_naming_it_or_a_counted_skip(dataset, tmp_path, caplog, monkeypatch, cut, truncated_flag):
    # data-juicer's import sets LOAD_TRUNCATED_IMAGES=True for the whole process; the check ignores it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", truncated_flag)
    name = cut(dataset)
    _fails(dataset, tmp_path, rf"1 image\(s\) listed in .*metadata.csv cannot be read: {name}: unreadable or truncated.*data.bad_images=skip")
    before = snapshot(dataset)
    with caplog.at_level(logging.WARNING):
        records = load_records(dataset, bad_images="skip")
    assert [r.path.name for r in records] == ["0.png", "1.png", "3.png"]
    assert f"leaving out 1 unreadable image(s): {name}" in caplog.text
    dm = ImageCaptionDataModule(records, resolution=64)
    assert all(dm.dataset[(i, 0)]["pixel_values"].shape == (3, 64, 64) for i in range(len(dm.dataset)))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is truncated_flag  # the user's setting is given back
    assert snapshot(dataset) == before


def test_image_over_pillows_pixel_limit_is_refused_without_decoding(dataset, tmp_path, monkeypatch):
    # over twice the limit Pillow refuses to open the file itself (a PNG that claims 20000x20000 pixels)
    image = dataset / "images" / "0.png"
    good = image.read_bytes()
    image.write_bytes(bomb_png(20000, 20000))
    _fails(dataset, tmp_path, r"1 image\(s\) listed in .*cannot be read: 0.png: decompression bomb \(Image size \(400000000 pixels\) exceeds limit")
    # between 1x and 2x the limit Pillow only warns; we still refuse, so one file cannot exhaust memory
    image.write_bytes(good)
    with Image.open(image) as im:
        pixels = im.size[0] * im.size[1]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels - 1)
    _fails(dataset, tmp_path, rf"4 image\(s\) listed in .*cannot be read: 0.png: decompression bomb \(Image size \({pixels} pixels\)")


def test_large_sets_show_a_progress_bar(tmp_path, capsys):
    root = tmp_path / "many"
    root.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, "PNG")
    for i in range(501):
        (root / f"{i}.png").write_bytes(buf.getvalue())
    (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,x\n" for i in range(501)))
    assert len(load_records(root)) == 501
    assert "checking images" in capsys.readouterr().err
    (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,x\n" for i in range(500)))
    load_records(root)
    assert "checking images" not in capsys.readouterr().err  # small sets: no bar


# -- 2. data.root spelled with ~, relative, or with .. -----------------------------------------

@pytest.mark.parametrize("spelling", ["'~/set'", "set", "./set/../set"], ids=["tilde", "relative", "dotdot"])
def test_root_spellings_train_up_to_the_model(tmp_path, monkeypatch, spelling):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    root = home / "set"
    (root / "3_red").mkdir(parents=True)  # kohya-style folder: folder_repeats must find it
    shutil.copy(QUICKSTART / "images" / "sks_00_red_circle.png", root / "3_red" / "a.png")
    shutil.copy(QUICKSTART / "images" / "sks_00_red_circle.png", root / "b.png")
    (root / "metadata.csv").write_text("file_name,text\n3_red/a.png,red\nb.png,blue\n")
    monkeypatch.chdir(tmp_path if spelling.startswith("'~") else home)
    before = snapshot(root)
    with pytest.raises(ModelLoadError, match="no-model' does not exist"):  # every data step passed
        _train(spelling, tmp_path)
    cfg = resolved(compose_cfg("experiment=quickstart", f"data.root={spelling}"))
    records = load_records(cfg["data"]["root"])
    assert records[0].path == root / "3_red" / "a.png"
    assert len(ImageCaptionDataModule.from_config(records, cfg["data"]).dataset) == 4  # 3 + 1
    assert snapshot(root) == before


# -- 3, 4, 7. file_name values, and metadata that is odd ----------------------------------------

def _long_name(root):
    _add_csv_row(root, "images/" + "x" * 300 + ".png,too long")


def _outside(root, absolute):
    (root.parent / "elsewhere").mkdir()
    shutil.copy(root / "images" / "0.png", root.parent / "elsewhere" / "x.png")
    _add_csv_row(root, f"{root.parent / 'elsewhere' / 'x.png' if absolute else '../elsewhere/x.png'},outside")


BAD_METADATA = {
    # the same file written differently is a duplicate (3)
    "dot-slash": (lambda r: _add_csv_row(r, "./images/0.png,again"),
                  r"more than once: 'images/0.png' \(row 2\) and './images/0.png' \(row 6\), the same file"),
    "double-slash": (lambda r: _add_csv_row(r, "images//0.png,again"), r"'images/0.png' \(row 2\) and 'images//0.png' \(row 6\)"),
    "dotdot-inside": (lambda r: _add_csv_row(r, "images/../images/0.png,again"),
                      r"'images/0.png' \(row 2\) and 'images/../images/0.png' \(row 6\), the same file"),
    "absolute-inside": (lambda r: _add_csv_row(r, f"{r / 'images' / '0.png'},again"), r"'images/0.png' \(row 2\) and '/.*/images/0.png' \(row 6\)"),
    # outside the dataset folder (4)
    "dotdot-outside": (lambda r: _outside(r, False),
                       r"names 1 file\(s\) outside the dataset folder .*/data: row 6: '../elsewhere/x.png' is /.*/elsewhere/x.png\. "
                       r"Fix: move those images into the dataset folder.*data.allow_outside_root=true"),
    "absolute-outside": (lambda r: _outside(r, True), r"outside the dataset folder .*row 6: '/.* is /.*/elsewhere/x\.png\..*allow_outside_root"),
    # odd metadata (7)
    "file-name-is-a-folder": (lambda r: _add_csv_row(r, "images,a folder"),
                              r"names 1 folder\(s\) where an image file belongs: row 6: 'images'\. Fix: give each row the path of one image file"),
    "file-name-too-long": (_long_name, r"names 1 file\(s\) that do not exist .*row 6: 'images/xxx.*\.\.\. \(File name too long\)"),
    "csv-two-text-columns": (lambda r: (r / "metadata.csv").write_text("file_name,text,text\nimages/0.png,a,b\n"),
                             r"metadata.csv: the header has more than one 'text' column \(file_name,text,text\)\. Fix: keep one"),
    "csv-unquoted-commas": (lambda r: (r / "metadata.csv").write_text("file_name,text\n" + "".join(f"images/{i}.png,red, round\n" for i in range(4))),
                            r"metadata.csv: line 2 has 3 fields but the header has 2 \('images/0.png,red, round'\)\. Fix: put a caption that contains commas in double quotes"),
    "csv-open-quote": (lambda r: _add_csv_row(r, 'images/0.png,"never closed'), r"metadata.csv: line \d is not valid CSV \(.*\)\. Fix: check the double quotes"),
    "jsonl-nan-file-name": (lambda r: _jsonl(r, '{"file_name": NaN, "text": "x"}'),
                            r"metadata.jsonl has 1 file_name value\(s\) that are not a path: row 5: NaN\. Fix: write file_name as a string"),
    "jsonl-number-file-name": (lambda r: _jsonl(r, '{"file_name": 3, "text": "x"}'), r"not a path: row 5: 3\."),
    # caption values that are not a caption (5)
    "text-number": (lambda r: _jsonl(r, texts=["a", 5, "c", "d"]),
                    r"metadata.jsonl has 1 text value\(s\) that are not a caption: row 2: 5\. Fix: write text as a string.*or as a list of non-empty strings"),
    "text-nan": (lambda r: _jsonl(r, texts=["a", "b", float("nan"), "d"]), r"not a caption: row 3: NaN\."),
    "text-bool": (lambda r: _jsonl(r, texts=["a", "b", "c", True]), r"not a caption: row 4: true\."),
    "text-object": (lambda r: _jsonl(r, texts=[{"en": "a"}, "b", "c", "d"]), r'not a caption: row 1: \{"en": "a"\}\.'),
    "text-empty-list": (lambda r: _jsonl(r, texts=["a", [], "c", "d"]), r"not a caption: row 2: \[\]\."),
    "text-list-with-number": (lambda r: _jsonl(r, texts=["a", ["b", 2], "c", "d"]), r'not a caption: row 2: \["b", 2\]\.'),
    "text-list-with-empty": (lambda r: _jsonl(r, texts=["a", ["b", " "], "c", "d"]), r'not a caption: row 2: \["b", " "\]\.'),
}


@pytest.mark.parametrize("case", list(BAD_METADATA), ids=list(BAD_METADATA))
def test_odd_metadata_is_named_before_the_model_loads(dataset, tmp_path, case):
    setup, message = BAD_METADATA[case]
    setup(dataset)
    outside = {p: p.read_bytes() for p in tmp_path.rglob("elsewhere/*")}
    _fails(dataset, tmp_path, message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("elsewhere/*")} == outside


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
def test_outside_root_is_used_when_allowed(dataset, tmp_path, absolute):
    _outside(dataset, absolute)
    before = snapshot(dataset)
    cfg = resolved(compose_cfg("experiment=quickstart", f"data.root={dataset}", "data.allow_outside_root=true"))
    records = load_records(dataset, allow_outside_root=cfg["data"]["allow_outside_root"])
    assert records[-1].path == tmp_path / "elsewhere" / "x.png" and records[-1].text == "outside"
    assert folder_repeats(records, dataset, {"images": 2}) == [2, 2, 2, 2, 1]  # outside: no top folder
    dm = ImageCaptionDataModule.from_config(records, cfg["data"])
    assert dm.dataset[(len(dm.dataset) - 1, 0)]["text"] == "outside"
    assert snapshot(dataset) == before


def test_allow_outside_root_must_be_a_boolean(dataset, tmp_path):
    _fails(dataset, tmp_path, r"data.allow_outside_root must be true or false, got 'sometimes'",
           "data.allow_outside_root=sometimes", error=ConfigError)


# -- 5. alternative captions ----------------------------------------------------------------------

def test_alternative_captions_are_picked_per_sample_and_seen_everywhere(dataset, tmp_path):
    _jsonl(dataset, texts=[CAPTIONS, None, "caption 2", ["only one"]])
    before = snapshot(dataset)
    cfg = resolved(compose_cfg("experiment=quickstart", f"data.root={dataset}", "data.batch_size=2"))
    records = load_records(dataset)
    assert records[0].text == CAPTIONS[0] and records[0].captions == tuple(CAPTIONS)
    assert [r.text for r in records[1:]] == ["", "caption 2", "only one"] and records[3].alternatives == ()
    dm = ImageCaptionDataModule.from_config(records, cfg["data"], seed=0)
    assert set(dm.captions()) == {*CAPTIONS, "", "caption 2", "only one"}  # the text-embedding cache's list
    assert dm.val_set[0]["text"] == CAPTIONS[0]  # the validation loss compares: always the first

    sampler = TrainBatchSampler([(64, 64)] * len(dm.dataset), 2, seed=0)
    picks = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        picks += [dm.dataset[(i, s)]["text"] for batch in sampler for i, s in batch if i == 0]
    assert len(picks) == 8 and set(picks) == set(CAPTIONS)  # a new pick each epoch
    seeds = [s for batch in sampler for i, s in batch if i == 0]
    assert dm.dataset[(0, seeds[0])]["text"] == dm.dataset[(0, seeds[0])]["text"] == picks[-1]  # resume: same pick
    assert snapshot(dataset) == before


def test_alternative_captions_train_with_the_text_cache(dataset, tmp_path, tiny_sd15):
    import lightning as L

    from sdtune.training.module import LoRATrainingModule

    _jsonl(dataset, texts=[CAPTIONS, ["a green square", "a square"], "caption 2", "caption 3"])
    before = snapshot(dataset)
    cfg = resolved(compose_cfg("experiment=quickstart", f"data.root={dataset}", "data.batch_size=4", "data.val_images=0",
                               output_dir=tmp_path))
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    dm = ImageCaptionDataModule.from_config(load_records(dataset), cfg["data"])
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=dm)  # a caption missing from the cache is a KeyError
    assert {*CAPTIONS, "a green square", "a square"} <= set(module.text_cache.rows)
    assert snapshot(dataset) == before


# -- 6. a UTF-8 byte-order mark -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_metadata_with_a_byte_order_mark_is_read(dataset, kind):
    if kind == "jsonl":
        _jsonl(dataset)
    meta = dataset / f"metadata.{kind}"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    before = snapshot(dataset)
    records = load_records(dataset)
    assert [r.text for r in records] == [f"caption {i}" for i in range(4)]
    assert snapshot(dataset) == before


def test_unverified_unreadable_image_is_a_data_error_not_a_traceback(dataset, tmp_path):
    (dataset / "images" / "1.png").write_bytes(b"not an image at all")
    records = load_records(dataset, verify=False)
    with pytest.raises(DataError, match=r"cannot read training image .*1.png: .*Fix or remove it \(data.verify_images=true"):
        ImageCaptionDataModule(records, resolution=64)
