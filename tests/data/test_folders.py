"""kohya folders as datasets: sidecar captions, ``<N>_name`` repeats, caption-less images, and the
same repeat-weighted epoch directly and through `make data`."""

from __future__ import annotations

import json
import logging

import pytest
from safetensors import safe_open

from sdtune.data.datamodule import ImageCaptionDataModule, folder_repeats
from sdtune.data.records import load_records
from sdtune.utils.errors import DataError
from tests.helpers.images import add, textured

# 10_photos: 3 captioned images; 2_style: one captioned, one without a caption file; loose: 1
KOHYA = {
    "10_photos/a.png": "sks dog on grass",
    "10_photos/b.jpg": "sks dog, sitting",
    "10_photos/c.png": "sks dog, 狗",
    "2_style/d.png": "watercolor",
    "2_style/e.png": None,
    "loose.png": "plain",
}
EPOCH = 10 * 3 + 2 * 2 + 1  # images an epoch trains on, with repeats


def make_kohya(root, size: int = 64):
    for i, (name, caption) in enumerate(sorted(KOHYA.items())):
        add(root, name, textured(i, size, size), caption)
    return root


def _epoch(records, root) -> int:
    dm = ImageCaptionDataModule.from_config(records, {"root": str(root), "resolution": 64, "batch_size": 1,
                                                      "num_workers": 0, "center_crop": True, "random_flip": False,
                                                      "pin_memory": False})
    return len(dm.dataset)


def test_kohya_folder_reads_sidecar_captions_and_repeats(tmp_path, caplog):
    root = make_kohya(tmp_path / "set")
    with caplog.at_level(logging.WARNING):
        records = load_records(root)
    got = {r.path.relative_to(root).as_posix(): r.text for r in records}
    assert got == {k: v or "" for k, v in KOHYA.items()}
    assert "1 of 6 images have an empty caption; they train unconditionally" in caplog.text
    assert folder_repeats(records, root) == [10, 10, 10, 2, 2, 1]  # sorted: 10_photos, 2_style, loose
    assert _epoch(records, root) == EPOCH


def test_only_the_folder_under_the_root_sets_repeats(tmp_path):
    """kohya reads <N>_name on the folder right under the dataset (or under images/, as `make data`
    writes it); a deeper 2023_trip is a name, not 2023 repeats; 0_name is refused."""
    root = tmp_path / "set"
    add(root, "5_me/2023_trip/a.png", textured(1, 64, 64), "x")
    add(root, "images/3_cat/b.png", textured(2, 64, 64), "y")
    add(root, "misc/2023_trip/c.png", textured(3, 64, 64), "z")
    records = load_records(root)
    assert [r.path.name for r in records] == ["a.png", "b.png", "c.png"]
    assert folder_repeats(records, root) == [5, 3, 1]
    add(root, "0_none/d.png", textured(4, 64, 64), "w")
    with pytest.raises(DataError, match=r"folder '0_none' .* asks for 0 repeats. Fix: rename it to 1_none"):
        folder_repeats(load_records(root), root)


def test_caption_extension_and_repeat_folders_under_images(tmp_path):
    root = tmp_path / "set"
    image = add(root, "images/3_cat/a.png", textured(1, 64, 64), None)
    image.with_suffix(".caption").write_text("a cat", encoding="utf-8")
    image.with_suffix(".txt").write_text("the other caption file", encoding="utf-8")
    records = load_records(root, caption_extension="caption")
    assert [r.text for r in records] == ["a cat"]
    assert [r.text for r in load_records(root)] == ["the other caption file"]  # .txt by default
    assert folder_repeats(records, root) == [3]  # images/3_cat: as `make data` lays kohya folders out
    with pytest.raises(DataError, match=r"data.caption_extension='.png' is not a caption file extension.*\.txt"):
        load_records(root, caption_extension=".png")


def test_caption_less_folder_trains_unconditionally(tmp_path, caplog):
    root = tmp_path / "set"
    for i in range(3):
        add(root, f"{i}.png", textured(i, 64, 64), None)
    with caplog.at_level(logging.WARNING):
        records = load_records(root)
    assert [r.text for r in records] == ["", "", ""]
    assert "3 of 3 images have an empty caption; they train unconditionally" in caplog.text


def test_bad_caption_file_names_the_file(tmp_path):
    root = tmp_path / "set"
    add(root, "a.png", textured(1, 64, 64), None)
    (root / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"caption file .*a\.txt is not UTF-8 text .*Fix: save it as UTF-8"):
        load_records(root)


def test_data_juicer_rows_in_metadata_jsonl(tmp_path):
    """The seeds' Kolors file: {"text", "image": [path]} rows in metadata.jsonl train as they are."""
    root = tmp_path / "set"
    add(root, "train/0.jpg", textured(1, 64, 64), None)
    add(root, "train/1.jpg", textured(2, 64, 64), None)
    rows = [{"text": "二次元", "image": [str(root / "train" / "0.jpg")]}, {"text": "<__dj__image> 风景 <|__dj__eoc|>", "images": ["train/1.jpg"]}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [(r.path.name, r.text) for r in load_records(root)] == [("0.jpg", "二次元"), ("1.jpg", "风景")]


def _header(path) -> dict:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


@pytest.mark.slow
def test_kohya_folder_trains_directly_and_through_make_data_with_the_same_epoch(tmp_path, tiny_sd15):
    """Acceptance: the folder trains as it is, and after `make data MODEL=sd15`, on the same
    repeat-weighted epoch (10_photos stays a repeat folder under OUT/images/)."""
    from data_pipeline.__main__ import main as stage
    from sdtune.run.train import train
    from tests.helpers.config import compose_cfg

    raw = make_kohya(tmp_path / "raw", size=512)  # 512 px: what the sd15 recipe keeps
    assert stage([str(raw), str(tmp_path / "clean"), "--model", "sd15", "--np", "1"]) == 0
    clean = tmp_path / "clean"
    assert (clean / "images" / "10_photos" / "a.png").is_file()
    direct, staged = load_records(raw), load_records(clean)
    assert [r.text for r in direct] == [r.text for r in staged]
    assert _epoch(direct, raw) == _epoch(staged, clean) == EPOCH

    for name, root in (("direct", raw), ("staged", clean)):
        out = tmp_path / name
        cfg = compose_cfg("model=tiny", f"data.root={root}", "trainer=cpu", "trainer.max_steps=1", "~logger",
                          *(f"callbacks.{c}=null" for c in ("model_checkpoint", "samples", "loss_plot", "summary", "lr_monitor")),
                          output_dir=out)
        train(cfg, out)
        assert _header(out / "lora.safetensors")["ss_num_train_images"] == str(EPOCH), name  # kohya counts repeats
