"""Masked loss (``train.masked_loss``): where masks come from, that they follow their image
through every transform, how they weight the loss, and that the latent cache carries them."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.buckets import assign_buckets
from sdtune.data.collate import collate
from sdtune.data.datamodule import ImageCaptionDataModule, ImageCaptionDataset
from sdtune.data.latents import LatentCache
from sdtune.data.masks import find_mask, find_masks, mask_manifest, to_latent_grid
from sdtune.data.records import load_records
from sdtune.training.checkpointing import data_manifest, describe_data_change
from sdtune.training.diffusion import weighted_mse
from sdtune.utils.errors import DataError


def _noise_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, bands), dtype=np.uint8), mode)


@pytest.fixture
def masked_set(tmp_path):
    """Three images of different sizes whose mask files are each image's own red channel, so a
    mask that went through the same resize, crop and flip equals the red channel of the crop."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks" / "images").mkdir(parents=True)
    rows = ["file_name,text"]
    for i, (h, w) in enumerate([(70, 100), (96, 64), (80, 80)]):
        image = _noise_image(h, w, i)
        image.save(root / "images" / f"{i}.png")
        image.getchannel("R").save(root / "masks" / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,caption {i}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_the_mask_gets_the_images_own_crop_flip_and_bucket(masked_set):
    """Catches a mask cropped at another offset, not mirrored with its image, or resized to another
    bucket: any of these makes the mask differ from the red channel of the served crop."""
    records = load_records(masked_set)
    masks = find_masks(records, masked_set)
    sizes = [Image.open(r.path).size[::-1] for r in records]
    targets = assign_buckets(sizes, 48, step=16)
    ds = ImageCaptionDataset(records, 48, center_crop=False, random_flip=True, targets=targets, sizes=sizes,
                             masks=masks)
    flips, offsets = set(), set()
    for item in range(len(records)):
        for seed in range(12):
            sample = ds[(item, seed)]
            red = (sample["pixel_values"][0] + 1) * 127.5
            assert sample["mask"].shape == (1, *targets[item])
            assert torch.equal((sample["mask"][0] * 255).round(), red.round()), (item, seed)
            flips.add(random.Random(seed).random() < 0.5)
            offsets.add((item, tuple(sample["crop_top_left"].tolist())))
    assert flips == {True, False} and len(offsets) > len(records)  # both mirrored and not, several crop offsets


def test_alpha_channel_mask_folder_precedence_and_unmasked_images(tmp_path, caplog):
    """The folder's mask wins over the alpha channel, the alpha channel is read when there is no file,
    and an image with neither trains unmasked (a mask of ones), counted in one log line."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rgba = _noise_image(64, 64, 1, "RGBA")
    rgba.save(root / "images" / "alpha.png")
    rgba.save(root / "images" / "both.png")
    _noise_image(64, 64, 2).save(root / "images" / "plain.png")
    (root / "masks").mkdir()
    Image.new("L", (64, 64), 128).save(root / "masks" / "both.png")  # flat layout: masks/<name>
    (root / "metadata.csv").write_text("file_name,text\nimages/alpha.png,a\nimages/both.png,b\nimages/plain.png,c\n")
    records = load_records(root)
    with caplog.at_level(logging.INFO, logger="sdtune.data.masks"):
        sources = find_masks(records, root)
    assert [s[0] if s else None for s in sources] == ["alpha", "file", None]  # alpha.png, both.png, plain.png
    assert "1 image(s) masked by a file under masks/, 1 by their alpha channel, 1 unmasked" in caplog.text
    ds = ImageCaptionDataset(records, 64, masks=sources)
    alpha = torch.from_numpy(np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255)
    assert torch.equal(ds[(0, 0)]["mask"][0], alpha)
    assert torch.equal(ds[(1, 0)]["mask"][0], torch.full((64, 64), 128 / 255))
    assert torch.equal(ds[(2, 0)]["mask"], torch.ones(1, 64, 64))


def test_masked_loss_without_any_mask_or_with_a_wrong_size_mask_is_refused(dataset, tmp_path):
    records = load_records(dataset)
    with pytest.raises(DataError, match=r"none of the 4 images has a mask.*masks/images/a.png.*masked_loss=false"):
        find_masks(records, dataset)
    (dataset / "masks" / "images").mkdir(parents=True)
    Image.new("L", (10, 12)).save(dataset / "masks" / "images" / "0.png")
    with pytest.raises(DataError, match=r"masks/images/0.png is 10x12 but its image 0.png is 64x64"):
        find_masks(records, dataset)  # checked before training, before any model loads
    ds = ImageCaptionDataset(records, 64, masks=[find_mask(r.path, dataset) for r in records])  # unchecked
    with pytest.raises(DataError, match=r"mask .*masks/images/0.png is 10x12 but its image is 64x64"):
        ds[(0, 0)]


def test_loss_mask_weights_pixels_normalised_by_all_pixels_and_combines_with_min_snr():
    """Catches a mask that is ignored, normalised by its own sum instead of the pixel count (kohya's
    choice, documented), or applied after the min-SNR weights in the wrong place."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(weighted_mse(pred, target, mask=ones), weighted_mse(pred, target))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0
    mask[1, :, 4:] = 0.25
    snr = torch.tensor([0.5, 2.0])
    err = (pred - target) ** 2
    expected = torch.stack([(err[i] * mask[i]).sum() / err[i].numel() for i in range(2)]) * snr
    assert torch.allclose(weighted_mse(pred, target, snr, mask=mask), expected.mean())
    assert torch.allclose(weighted_mse(pred, target, snr, mask=mask, per_sample=True), expected)
    changed = pred.clone()
    changed[0, :, 4:] += 100.0  # only where sample 0's mask is black
    assert torch.equal(weighted_mse(changed, target, mask=mask, per_sample=True)[0],
                       weighted_mse(pred, target, mask=mask, per_sample=True)[0])


def test_latent_cache_carries_masks_and_a_changed_mask_is_a_new_entry(masked_set, tmp_path):
    """Catches cached latents served without their mask, a stale mask served after the mask file
    changed, and masks averaged onto the latent grid by anything but area."""
    records = load_records(masked_set)
    dm = ImageCaptionDataModule(records, resolution=32, masks=find_masks(records, masked_set))
    encoded = []

    def encode(pixels):  # a stand-in VAE: 8x downsampling to 8 channels (mean, logvar)
        encoded.append(len(pixels))
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 3, 1, 1)[:, :8]

    cache = LatentCache(tmp_path / "latents", "m")
    assert dm.prepare_latents(encode, cache) == 3
    sample = dm.dataset[(0, 0)]
    ds_pixels = ImageCaptionDataset(records, 32, masks=dm.dataset.masks)
    expected = to_latent_grid(ds_pixels[(0, 0)]["mask"][None], (4, 4))[0]
    assert "pixel_values" not in sample and torch.equal(sample["latent_mask"], expected)
    assert collate([sample, dm.dataset[(1, 0)]])["latent_mask"].shape == (2, 1, 4, 4)

    Image.new("L", (100, 70), 0).save(masked_set / "masks" / "images" / "0.png")  # a new mask for image 0
    dm2 = ImageCaptionDataModule(records, resolution=32, masks=find_masks(records, masked_set))
    assert dm2.prepare_latents(encode, cache) == 1
    assert torch.equal(dm2.dataset[(0, 0)]["latent_mask"], torch.zeros(1, 4, 4))
    assert torch.equal(dm2.dataset[(1, 0)]["latent_mask"], dm.dataset[(1, 0)]["latent_mask"])


def test_masks_are_named_in_the_resume_manifest(masked_set):
    records = load_records(masked_set)
    before = {**data_manifest(records, masked_set), **mask_manifest(find_masks(records, masked_set), masked_set)}
    assert "mask/masks/images/0.png" in before
    (masked_set / "masks" / "images" / "2.png").unlink()
    after = {**data_manifest(records, masked_set), **mask_manifest(find_masks(records, masked_set), masked_set)}
    assert "1 removed (e.g. mask/masks/images/2.png)" in describe_data_change(before, after)


def test_find_mask_for_an_image_outside_root_reads_only_its_alpha_channel(tmp_path):
    (tmp_path / "root" / "masks").mkdir(parents=True)
    _noise_image(8, 8, 0).save(tmp_path / "x.png")
    _noise_image(8, 8, 0, "RGBA").save(tmp_path / "y.png")
    Image.new("L", (8, 8)).save(tmp_path / "root" / "masks" / "x.png")  # not its mask: x is outside root
    assert find_mask(tmp_path / "x.png", tmp_path / "root") is None
    assert find_mask(tmp_path / "y.png", tmp_path / "root") == ("alpha", tmp_path / "y.png")


def test_a_kohya_folders_masks_are_not_training_images(tmp_path):
    """Catches masks under a kohya folder (no metadata file) read back as training images."""
    root = tmp_path / "data"
    (root / "10_me").mkdir(parents=True)
    (root / "masks" / "10_me").mkdir(parents=True)
    _noise_image(64, 64, 0).save(root / "10_me" / "a.png")
    (root / "10_me" / "a.txt").write_text("a photo of sks")
    Image.new("L", (64, 64), 255).save(root / "masks" / "10_me" / "a.png")
    records = load_records(root, skip_folders=("masks",))
    assert [r.path.name for r in records] == ["a.png"] and records[0].text == "a photo of sks"
    assert find_masks(records, root) == [("file", root / "masks" / "10_me" / "a.png")]
    assert len(load_records(root)) == 2  # without the skip (masked loss off) the folder is as it was
