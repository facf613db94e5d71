"""Bucketing, caption dropout and tag shuffling, per-folder repeats, and the latent cache."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import lightning as L
import pytest
import torch
from PIL import Image

from sdtune.data.buckets import assign_buckets
from sdtune.data.captions import CaptionOptions, process_caption
from sdtune.data.datamodule import ImageCaptionDataModule, folder_repeats
from sdtune.data.images import plan_crop
from sdtune.data.records import load_records
from sdtune.data.sampler import TrainBatchSampler, sample_seed
from sdtune.run.train import train
from sdtune.training.module import LoRATrainingModule
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.paths import QUICKSTART


def _dataset(root, sizes: dict[str, tuple[int, int]]):
    root.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,text"]
    for name, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (len(name) * 20 % 255, 90, 30)).save(root / name)
        lines.append(f"{name},{name} caption")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


MIXED = {
    "wide1.png": (128, 64), "wide2.png": (200, 100), "wide3.png": (130, 64),
    "tall1.png": (64, 128), "tall2.png": (100, 200),
    "sq1.png": (96, 96), "sq2.png": (80, 80),
    "photo.png": (150, 100),  # 3:2 -> bucket (48, 80), cropped 2 px from the top
}


def test_buckets_give_single_shape_batches_with_recorded_geometry(tmp_path):
    root = _dataset(tmp_path / "mixed", MIXED)
    dm = ImageCaptionDataModule(load_records(root), resolution=64, batch_size=2, bucketing=True, bucket_step=16)
    by_name = {r.path.name: i for i, r in enumerate(dm.dataset.records)}
    assert dm.dataset.targets[by_name["wide2.png"]] == (48, 96)
    assert dm.dataset.targets[by_name["tall2.png"]] == (96, 48)
    assert dm.dataset.targets[by_name["sq1.png"]] == (64, 64)
    assert dm.dataset.targets[by_name["photo.png"]] == (48, 80)
    seen = Counter()
    for batch in dm.train_dataloader():
        shapes = {tuple(t) for t in batch["target_size"].tolist()}
        assert len(shapes) == 1  # one shape per batch
        h, w = shapes.pop()
        assert batch["pixel_values"].shape[-2:] == (h, w)
        for text, orig, crop in zip(batch["text"], batch["original_size"].tolist(), batch["crop_top_left"].tolist()):
            name = text.split(" ")[0]
            iw, ih = MIXED[name]
            assert orig == [ih, iw]
            assert crop == list(plan_crop((ih, iw), (h, w))[1].crop_top_left)
            seen[name] += 1
    assert seen == Counter(dict.fromkeys(MIXED, 1))  # every image exactly once per epoch
    photo = dm.dataset[by_name["photo.png"]]
    assert photo["crop_top_left"].tolist() == [2, 0] and photo["original_size"].tolist() == [100, 150]


def test_small_images_are_not_upscaled_unless_asked():
    assert assign_buckets([(40, 40)], 64, step=16) == [(32, 32)]
    assert assign_buckets([(40, 40)], 64, step=16, upscale=True) == [(64, 64)]
    assert assign_buckets([(64, 128)], 64, step=16) == [(48, 96)]  # big enough: normal bucket


def test_sampler_reshuffles_per_epoch_shards_ranks_and_resumes():
    buckets = [(64, 64)] * 6 + [(48, 96)] * 5
    sampler = TrainBatchSampler(buckets, 2, seed=3)
    first = list(sampler)
    items = [i for b in first for i, _ in b]
    assert sorted(items) == list(range(11))
    assert all(len({buckets[i] for i, _ in b}) == 1 for b in first)  # one shape per batch
    assert len({s for b in first for _, s in b}) == 11  # every sample its own seed
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # reproducible from seed + epoch
    sampler.skip(3)
    assert list(sampler) == first[3:]  # a resumed epoch carries on with the next batch...
    assert list(sampler) == first  # ...and only that once
    # two ranks of batch 2 see exactly the samples, and seeds, of one process with batch 4
    whole = list(TrainBatchSampler([(64, 64)] * 12, 4, seed=3))
    ranks = [list(TrainBatchSampler([(64, 64)] * 12, 2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == whole
    assert sample_seed(1, 0, 0, 0) != sample_seed(1, 0, 0, 1) != sample_seed(2, 0, 0, 1)
    # several ranks and uneven buckets: the last batch of a bucket is padded, nothing is left out
    uneven = [(64, 64)] * 13 + [(48, 96)] * 3
    per_rank = [list(TrainBatchSampler(uneven, 4, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = {i for rank in per_rank for b in rank for i, _ in b}
    assert seen == set(range(16))
    assert all(len(b) == 4 and len({uneven[i] for i, _ in b}) == 1 for rank in per_rank for b in rank)


def test_caption_dropout_and_tag_shuffle():
    rng = random.Random(0)
    opts = CaptionOptions(dropout=0.25)
    dropped = sum(process_caption("a cat", opts, rng) == "" for _ in range(4000))
    assert 850 < dropped < 1150
    shuffle = CaptionOptions(shuffle_tags=True, keep_tags=2)
    text = "sks, cat, red, sitting, table, photo"
    outs = {process_caption(text, shuffle, rng) for _ in range(50)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "cat"] and sorted(tags) == sorted(text.split(", "))
    assert process_caption(text, CaptionOptions(), rng) == text


def test_folder_repeats_kohya_style_and_explicit(tmp_path):
    for folder in ("3_cat", "dog", "misc"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\n3_cat/a.png,c\ndog/a.png,d\nmisc/a.png,m\n")
    records = load_records(tmp_path)
    assert folder_repeats(records, tmp_path) == [3, 1, 1]
    assert folder_repeats(records, tmp_path, {"dog": 5, "3_cat": 2}) == [2, 5, 1]
    dm = ImageCaptionDataModule(records, resolution=8, repeats=folder_repeats(records, tmp_path, {"dog": 5}))
    assert len(dm.dataset) == 9


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.caption_dropout=1.5", r"data.caption_dropout must be in \[0, 1\)"),
        ("data.bucket_step=12", r"data.bucket_step=12 must be a multiple of 8"),
        ("+data.repeats.cats=0", r"data.repeats.cats must be an integer >= 1"),
    ],
)
def test_bad_data_feature_settings(tmp_path, override, message):
    cfg = compose_cfg("experiment=quickstart", override, output_dir=tmp_path)
    with pytest.raises(ConfigError, match=message):
        train(cfg, tmp_path)


def test_latent_cache_needs_center_crop(tmp_path):
    cfg = compose_cfg("experiment=quickstart", "data.cache_latents=true", "data.center_crop=false", output_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs data.center_crop=true"):
        train(cfg, tmp_path)


class EncoderCalls(L.Callback):
    """Counts images through the VAE encoder, split into cache filling and training steps."""

    def __init__(self, vae):
        self.in_step = False
        self.images_in_steps = 0
        self.images_outside = 0
        vae.encoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.in_step:
            self.images_in_steps += args[0].shape[0]
        else:
            self.images_outside += args[0].shape[0]

    def on_train_batch_start(self, *_):
        self.in_step = True

    def on_train_batch_end(self, *_):
        self.in_step = False


def _fit_cached(tmp_path, data_root, *overrides, steps=6):
    cfg = compose_cfg("experiment=quickstart", f"data.root={data_root}", "data.cache_latents=true",
                      f"data.latent_cache_dir={tmp_path / 'latents'}", *overrides, output_dir=tmp_path)
    cfg_dict = resolved(cfg)
    module = LoRATrainingModule(cfg_dict)
    module.setup("fit")
    calls = EncoderCalls(module.parts.vae)
    dm = ImageCaptionDataModule.from_config(load_records(data_root), cfg_dict["data"])
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[calls])
    trainer.fit(module, datamodule=dm)
    return module, dm, calls, trainer


def test_latent_cache_encodes_once_and_only_changed_images(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(QUICKSTART, data)
    module, dm, calls, trainer = _fit_cached(tmp_path, data, steps=6)  # 12 images, batch 4: two epochs
    assert trainer.current_epoch >= 1
    assert calls.images_outside == 12 and calls.images_in_steps == 0
    # the cached distribution is what a fresh encode gives
    pixels, _ = dm.dataset.pixels(0, False)
    fresh = module.parts.vae.to("cpu").encode(pixels[None]).latent_dist.parameters[0]
    cached = dm.dataset.latents.serve(dm.dataset.latent_keys[(0, False)])["latent_params"]
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)

    # change one image's bytes: exactly that one is encoded again
    target = data / dm.dataset.records[5].path.relative_to(data)
    Image.open(target).convert("RGB").rotate(90).save(target)
    _, _, calls2, _ = _fit_cached(tmp_path, data, steps=3)
    assert calls2.images_outside == 1 and calls2.images_in_steps == 0

    # another resolution is another crop: nothing stale is reused
    _, _, calls3, _ = _fit_cached(tmp_path, data, "data.resolution=32", steps=3)
    assert calls3.images_outside == 12


def test_latent_cache_with_random_flip_caches_both_orientations(tmp_path):
    _, dm, calls, _ = _fit_cached(tmp_path, QUICKSTART, "data.random_flip=true", steps=4)
    assert calls.images_outside == 24 and calls.images_in_steps == 0
    assert {flip for (_, flip) in dm.dataset.latent_keys} == {False, True}
