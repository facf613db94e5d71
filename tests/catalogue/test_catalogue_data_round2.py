"""Catalogue round 2 (issue 25), training data: repeat counts that would fill memory, kohya folders
that skipped or mislabelled files without a word, and data errors that named the wrong key or came
only after the model loaded. Each case is our message, exit 2, before any model loads, and no user
file changed.

Runs that should fail point ``model.path`` at a missing folder: if our check did not fire, the run
stops at the model with a different message in a second instead of training.
"""

from __future__ import annotations

import logging
import os
import re

import pytest
from PIL import Image

from sdtune.data.datamodule import (
    MAX_EPOCH_SAMPLES,
    ImageCaptionDataModule,
    ImageCaptionDataset,
    check_epoch_size,
    folder_repeats,
)
from sdtune.data.masks import find_masks
from sdtune.data.records import load_records
from sdtune.utils.errors import DataError
from tests.helpers.cli import run_main
from tests.helpers.config import compose_cfg
from tests.helpers.files import snapshot
from tests.helpers.paths import QUICKSTART


def _image(path, size=(64, 64), color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode != "RGBA" else (*color, 0)).save(path)
    return path


def _fails(capsys, tmp_path, root, *overrides) -> str:
    """``python -m sdtune`` on ``root`` exits 2 before any model loads and changes no file under
    ``root``; its stderr."""
    before = snapshot(root)
    code, err = run_main(capsys, "experiment=quickstart", f"data.root={root}", "model.tiny=false",
                         f"model.path={tmp_path / 'no-model'}", "trainer.max_steps=2", "callbacks.samples=null",
                         "data.val_images=0", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "caching text embeddings" not in err
    assert "no-model" not in err, err[-3000:]  # stopped by our data check, not by the missing model
    assert snapshot(root) == before
    return err


def _data_cfg(root, **extra) -> dict:
    return {"root": str(root), "resolution": 64, "batch_size": 1, "num_workers": 0, "center_crop": True,
            "random_flip": False, "pin_memory": False, **extra}


# -- unbounded sizes ---------------------------------------------------------------------------

def test_a_huge_kohya_repeat_count_is_refused_before_any_list_is_built(capsys, tmp_path):
    """``999999999_x`` grew memory by 1 GB every 5 s: the repeat list was built in full. The count
    is checked where it is read, so the unfixed code fails the first assertion without allocating."""
    root = tmp_path / "set"
    _image(root / "999999999_x" / "a.png")
    records = load_records(root)
    with pytest.raises(DataError) as err:
        folder_repeats(records, root)  # returned [999999999] before; the dataset then built that list
    message = str(err.value)
    assert "folder '999999999_x'" in message and "asks for 999,999,999 repeats" in message
    assert f"over sdtune's limit of {MAX_EPOCH_SAMPLES:,}" in message
    assert "rename it to e.g. 10_x" in message and "'++data.repeats={999999999_x:1}'" in message
    # the same through the command, before any model loads
    err_text = _fails(capsys, tmp_path, root)
    assert "folder '999999999_x'" in err_text and "Fix: rename it to e.g. 10_x" in err_text
    # the fix it gives is a valid override that trains the folder once
    cfg = compose_cfg("experiment=quickstart", f"data.root={root}", "++data.repeats={999999999_x:1}")
    assert folder_repeats(records, root, cfg.data.repeats) == [1]


def test_repeat_limit_holds_for_data_repeats_and_the_dataset_itself(tmp_path):
    root = tmp_path / "set"
    _image(root / "photos" / "a.png")
    records = load_records(root)
    with pytest.raises(DataError, match=r"data.repeats.photos=2,000,000: one epoch would be 2,000,000 samples.*"
                                        r"Fix: set a smaller count, e.g. '\+\+data.repeats=\{photos:10\}'"):
        folder_repeats(records, root, {"photos": 2_000_000})
    # the dataset refuses before building its index (over the limit by one: a bounded list if unfixed)
    with pytest.raises(DataError, match="one epoch would be 1,000,001 samples"):
        ImageCaptionDataset(records, 64, repeats=[MAX_EPOCH_SAMPLES + 1])
    check_epoch_size([1] * 3)  # a dataset is never refused for its own size, only for its repeats
    assert folder_repeats(records, root, {"photos": 3}) == [3]


# -- kohya folders ------------------------------------------------------------------------------

def test_a_symlinked_repeat_folder_is_followed_and_said(tmp_path, caplog):
    """``10_linked -> elsewhere`` was skipped: 2 images trained instead of 2 + 10 x 4 = 42."""
    root, elsewhere = tmp_path / "set", tmp_path / "elsewhere"
    for name in ("a", "b"):
        _image(root / "1_own" / f"{name}.png")
    for i in range(4):
        _image(elsewhere / f"{i}.png")
        (elsewhere / f"{i}.txt").write_text(f"linked {i}")
    os.symlink(elsewhere, root / "10_linked")
    os.symlink(root, elsewhere / "back")  # a loop inside the link: skipped, not walked forever
    before = (snapshot(root), snapshot(elsewhere))
    with caplog.at_level(logging.INFO):
        records = load_records(root)
    assert len(records) == 6 and sum(folder_repeats(records, root)) == 42
    assert [r.text for r in records if "10_linked" in r.path.parts] == [f"linked {i}" for i in range(4)]
    assert f"following the symbolic link 10_linked -> {elsewhere}" in caplog.text
    assert "skipping 10_linked/back: a symbolic link to" in caplog.text and "(a loop)" in caplog.text
    dm = ImageCaptionDataModule.from_config(records, _data_cfg(root))
    assert len(dm.dataset) == 42
    assert (snapshot(root), snapshot(elsewhere)) == before


def test_captions_whose_extension_differs_in_case_are_named_with_the_fix(capsys, tmp_path):
    """``.TXT`` under the default ``.txt`` said only "4 of 4 images have an empty caption"."""
    root = tmp_path / "set"
    for i in range(4):
        _image(root / "5_red" / f"{i}.png")
        (root / "5_red" / f"{i}.TXT").write_text(f"caption {i}")
    err = _fails(capsys, tmp_path, root)
    assert re.search(r"4 image\(s\) in \S+ have no \.txt caption file, but a file whose name differs only in "
                     r"case: 5_red/0\.TXT \(for 0\.png\); 5_red/1\.TXT", err), err[-2000:]
    assert "Fix: data.caption_extension=.TXT" in err and "empty caption" in err
    assert [r.text for r in load_records(root, caption_extension=".TXT")] == [f"caption {i}" for i in range(4)]


@pytest.mark.parametrize("kind", ["loop", "broken"])
def test_an_image_link_to_nothing_is_named_as_such_not_as_a_metadata_row(capsys, tmp_path, kind):
    """A link loop in a kohya folder read "file_name does not exist ... relative to the metadata file"."""
    root = tmp_path / "set"
    _image(root / "a.png")
    os.symlink(root / ("b.png" if kind == "loop" else "gone.png"), root / "b.png")
    err = _fails(capsys, tmp_path, root)
    why = "a symbolic link loop" if kind == "loop" else f"a broken symbolic link to {root / 'gone.png'}"
    assert f"has 1 image file(s) that are symbolic links leading to no file: 'b.png' ({why})" in err, err[-2000:]
    assert "Fix: point each link at an image file, or remove it." in err
    assert "metadata" not in err.lower() and "row" not in err.split("b.png")[0].split("\n")[-1]


def test_an_image_link_loop_in_a_metadata_dataset_names_its_row(dataset):
    (dataset / "images" / "0.png").unlink()
    os.symlink(dataset / "images" / "0.png", dataset / "images" / "0.png")
    with pytest.raises(DataError, match=r"metadata.csv names 1 image file\(s\) that are symbolic links leading to "
                                        r"no file: row 2: 'images/0.png' \(a symbolic link loop\).*remove it and its row"):
        load_records(dataset)


# -- the right key, before the model ------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "empty"])
def test_a_bad_class_root_names_data_class_root(capsys, tmp_path, case):
    classes = tmp_path / "classes"
    if case == "empty":
        classes.mkdir()
    err = _fails(capsys, tmp_path, QUICKSTART, f"data.class_root={classes}")
    what = "does not exist" if case == "missing" else "holds no images"
    assert f"data.class_root='{classes}' {what}" in err, err[-2000:]
    assert "Fix: set data.class_root" in err if case == "missing" else "Fix: point data.class_root" in err
    assert "data.root" not in err


def _masked(dataset, mask, count=4):
    """Masks for the first ``count`` images of the ``dataset`` fixture: ``mask(i)`` is an image or bytes."""
    for i in range(count):
        path = dataset / "masks" / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        made = mask(i)
        path.write_bytes(made) if isinstance(made, bytes) else made.save(path)


def test_masks_of_the_wrong_size_or_not_images_are_named_before_the_model(capsys, tmp_path, dataset):
    """Both were caught only after the model loaded: pre-flight decoded the images, not the masks."""
    _masked(dataset, lambda i: {0: Image.new("L", (32, 48), 255), 1: b"not an image"}.get(i, Image.new("L", (64, 64), 255)))
    err = _fails(capsys, tmp_path, dataset, "train.masked_loss=true")
    assert "train.masked_loss: 2 mask(s) cannot mask their image:" in err, err[-2000:]
    assert f"{dataset / 'masks' / 'images' / '0.png'} is 32x48 but its image 0.png is 64x64" in err
    assert f"{dataset / 'masks' / 'images' / '1.png'}: not a readable image (UnidentifiedImageError" in err
    assert "Fix: save each mask as a greyscale image (PNG) at its image's size" in err


@pytest.mark.parametrize("source", ["black-files", "transparent-alpha"])
def test_masks_that_are_all_black_are_refused(capsys, tmp_path, dataset, source):
    """They trained to a loss of exactly 0.0 with no warning."""
    if source == "black-files":
        _masked(dataset, lambda i: Image.new("L", (64, 64), 0))
    else:
        for i in range(4):
            _image(dataset / "images" / f"{i}.png", mode="RGBA")  # fully transparent
    err = _fails(capsys, tmp_path, dataset, "train.masked_loss=true")
    assert "train.masked_loss: every one of the 4 images' masks are all black (or fully transparent)" in err, err[-2000:]
    assert ("masks/images/0.png" if source == "black-files" else "images/0.png (its alpha channel)") in err
    assert "would train to a loss of 0 and learn nothing" in err and "train.masked_loss=false" in err


def test_some_all_black_masks_are_a_warning_naming_them(dataset, caplog):
    _masked(dataset, lambda i: Image.new("L", (64, 64), 0 if i == 2 else 255))
    before = snapshot(dataset)
    records = load_records(dataset, skip_folders=("masks",))
    with caplog.at_level(logging.WARNING):
        sources = find_masks(records, dataset)
    assert len(sources) == 4
    assert f"1 of 4 images' masks are all black (or fully transparent): {dataset / 'masks' / 'images' / '2.png'}" in caplog.text
    assert "adds nothing to the loss" in caplog.text
    assert snapshot(dataset) == before
