"""Dataset folder validation, image decoding and the training transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.datamodule import ImageCaptionDataModule, ImageCaptionDataset
from sdtune.data.images import load_rgb, resize_and_crop, to_pil, to_tensor
from sdtune.data.records import load_records
from sdtune.utils.errors import DataError
from tests.helpers.paths import QUICKSTART


def _img(path, size=(40, 30), colour=(200, 10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_quickstart_records_are_valid():
    records = load_records(QUICKSTART)
    assert len(records) == 12
    assert all(r.path.is_file() and r.text.startswith("a ") for r in records)


def test_jsonl_metadata_and_subfolders(tmp_path):
    _img(tmp_path / "sub" / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "sub/x.png", "text": "二次元，一个紫色短发小女孩"}\n\n', encoding="utf-8")
    [rec] = load_records(tmp_path)
    assert rec.path == tmp_path / "sub" / "x.png" and rec.text == "二次元，一个紫色短发小女孩"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, r"data.root='.*nope' does not exist.*Fix: set data.root"),
        (lambda root: root.mkdir(), r"holds no images"),
        (
            lambda root: (_img(root / "a.png"), (root / "metadata.csv").write_text("image,caption\na.png,x\n")),
            r"metadata.csv has no 'file_name' or 'text' column \(found: \['image', 'caption'\]\).*Fix: name",
        ),
        (
            lambda root: (_img(root / "a.png"), (root / "metadata.csv").write_text("file_name,text\na.png,x\nb.png,y\n")),
            r"names 1 file\(s\) that do not exist.*row 3: 'b.png'",
        ),
        (
            lambda root: (root.mkdir(), (root / "metadata.csv").write_text("file_name,text\n")),
            r"lists no images",
        ),
        (
            lambda root: (_img(root / "a.png"), (root / "metadata.csv").write_bytes("file_name,text\na.png,caf\xe9\n".encode("latin-1"))),
            r"metadata.csv is not UTF-8.*save it as UTF-8",
        ),
    ],
    ids=["missing-folder", "no-images", "wrong-columns", "missing-file", "empty-metadata", "not-utf8"],
)
def test_bad_dataset_folders_name_the_problem(tmp_path, setup, message):
    root = tmp_path / "nope"
    setup(root)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=message):
        load_records(root)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched


def test_image_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "rgba.png")
    assert load_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (4, 4), 128).save(tmp_path / "gray.png")
    assert load_rgb(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = load_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert abs(load_rgb(tmp_path / "deep.png").getpixel((0, 0))[0] - 128) <= 1  # scaled, not clipped to white
    pal = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    pal.save(tmp_path / "pal.png")
    assert load_rgb(tmp_path / "pal.png").getpixel((0, 0)) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[0] > 200  # the strip is now at the top


def test_resize_shorter_side_and_crop_records_geometry():
    im = Image.new("RGB", (200, 100))
    out, info = resize_and_crop(im, (64, 64), center_crop=True)
    assert out.size == (64, 64)
    assert info.original_size == (100, 200) and info.target_size == (64, 64)
    assert info.crop_top_left == (0, (128 - 64) // 2)
    import random

    _, rinfo = resize_and_crop(im, (64, 64), center_crop=False, rng=random.Random(3))
    assert rinfo.crop_top_left[0] == 0 and 0 <= rinfo.crop_top_left[1] <= 64


def test_tensor_range_and_round_trip():
    im = Image.fromarray(np.array([[[0, 128, 255]]], dtype=np.uint8))
    t = to_tensor(im)
    assert t.shape == (3, 1, 1)
    torch.testing.assert_close(t.flatten(), torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    assert to_pil(t).getpixel((0, 0)) == (0, 128, 255)


def test_dataset_items_and_flip(tmp_path):
    im = Image.new("RGB", (80, 64), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 16, 64))  # white band on the left edge; the crop keeps half
    im.save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,hello\n")
    records = load_records(tmp_path)
    plain = ImageCaptionDataset(records, 64)[0]
    assert plain["pixel_values"].shape == (3, 64, 64) and plain["text"] == "hello"
    assert plain["pixel_values"].min() >= -1 and plain["pixel_values"].max() <= 1
    assert plain["original_size"].tolist() == [64, 80] and plain["crop_top_left"].tolist() == [0, 8]
    import random

    random.seed(0)
    flipped = [ImageCaptionDataset(records, 64, random_flip=True)[0]["pixel_values"] for _ in range(20)]
    right_bright = [bool((f[:, :, -1] > 0.5).all()) for f in flipped]
    assert any(right_bright) and not all(right_bright)  # flipped sometimes, not always


def test_datamodule_batches(tmp_path):
    dm = ImageCaptionDataModule(load_records(QUICKSTART), resolution=32, batch_size=5)
    batches = list(dm.train_dataloader())
    assert sorted(len(b["text"]) for b in batches) == [2, 5, 5]  # 12 images: every one, once
    full = next(b for b in batches if len(b["text"]) == 5)
    assert full["pixel_values"].shape == (5, 3, 32, 32) and full["original_size"].shape == (5, 2)
    assert full["seed"].dtype == torch.int64 and len(set(full["seed"].tolist())) == 5
