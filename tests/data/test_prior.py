"""DreamBooth prior preservation: N instance + N class samples per batch, the class loss weighted
by ``train.prior_loss_weight``, class images rendered once into the cache and reused."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.prior import class_seed
from sdtune.data.records import load_records
from sdtune.training.class_images import class_image_folder, ensure_class_images
from sdtune.training.diffusion import split_prior_loss
from sdtune.utils.errors import ConfigError
from tests.helpers.cli import run_main
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.files import snapshot
from tests.helpers.models import tiny_model
from tests.helpers.paths import CACHE


@pytest.fixture
def class_set(tmp_path, dataset):
    """Three class images (copies of quickstart images) with their own captions."""
    root = tmp_path / "classes"
    (root / "images").mkdir(parents=True)
    rows = ["file_name,text"]
    for i, src in enumerate(sorted((dataset / "images").glob("*.png"))[:3]):
        shutil.copy(src, root / "images" / f"c{i}.png")
        rows.append(f"images/c{i}.png,class caption {i}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_each_batch_is_n_instance_then_n_class_samples_picked_by_the_sample_seeds(dataset, class_set):
    """Catches a batch without its class half, class samples not marked as such, a class pick that
    does not come from the instance sample's seed (resume would then pair other images), and a
    class sample that reuses its instance's noise seed."""
    instance, classes = load_records(dataset), load_records(class_set)
    dm = ImageCaptionDataModule(instance, resolution=64, batch_size=2, random_flip=True, seed=3, class_records=classes)
    assert dm.captions() == [*(r.text for r in instance), *(r.text for r in classes), ""]  # text cache covers both
    loader = dm.train_dataloader()
    wrapper = loader.dataset
    batches = list(loader)
    assert len(batches) == 2
    picked = []
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["prior"].tolist() == [False, False, True, True]
        seeds = batch["seed"].tolist()
        assert all(t.startswith("caption ") for t in batch["text"][:2])
        for k in range(2):
            citem, cseed = wrapper.pick(seeds[k])
            assert seeds[2 + k] == cseed == class_seed(seeds[k]) != seeds[k]
            assert batch["text"][2 + k] == classes[citem].text
            picked.append(citem)
    assert sorted(t for b in batches for t in b["text"][:2]) == sorted(r.text for r in instance)  # every instance once
    again = list(dm.train_dataloader())
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) and a["text"] == b["text"] for a, b in zip(batches, again))


def test_prior_loss_is_instance_mean_plus_weight_times_class_mean():
    losses = torch.tensor([1.0, 3.0, 10.0, 30.0])
    prior = torch.tensor([False, False, True, True])
    total, class_loss = split_prior_loss(losses, prior, 0.5)
    assert class_loss.item() == 20.0 and total.item() == 2.0 + 0.5 * 20.0


def test_config_refuses_both_class_sources_and_an_empty_prompt(tmp_path):
    from sdtune.run.checks import validate

    base = ["model=tiny", f"data.root={tmp_path}"]
    with pytest.raises(ConfigError, match=r"data.class_root=.* and data.class_prompt=.* are both set"):
        validate(compose_cfg(*base, f"data.class_root={tmp_path}", "data.class_prompt=a dog"))
    with pytest.raises(ConfigError, match=r"data.num_class_images must be >= 1, got 0"):
        validate(compose_cfg(*base, "data.class_prompt=a dog", "data.num_class_images=0"))
    with pytest.raises(ConfigError, match=r"not supported.*data.cache_latents"):
        validate(compose_cfg(*base, "data.class_prompt=a dog", "data.cache_latents=true", "data.bucketing=true"))


def _class_cfg(tmp_path, *extra: str) -> dict:
    model = tiny_model("sd15")
    return resolved(compose_cfg("model=tiny", f"model.path={model}", f"data.root={tmp_path}",
                                f"paths.cache_dir={tmp_path / 'cache'}", "data.class_prompt=a red circle",
                                "data.num_class_images=3", "data.class_sample_steps=2", "trainer=cpu", *extra))


def test_class_images_are_rendered_once_into_the_cache_and_reused(tmp_path, caplog):
    """Catches class images rendered again by a later run (or written anywhere but the cache), a
    cache folder that ignores the prompt, and an unfinished folder trusted as complete."""
    cfg = _class_cfg(tmp_path)
    source = str(tiny_model("sd15"))
    folder = ensure_class_images(cfg, source)
    assert folder == class_image_folder(cfg, source) and folder.parent == tmp_path / "cache" / "class_images"
    files = sorted(p.name for p in (folder / "images").iterdir())
    assert files == ["00000.png", "00001.png", "00002.png"]
    assert (folder / "metadata.csv").read_text().splitlines() == [
        "file_name,text", *(f"images/{n},a red circle" for n in files)]
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    caplog.clear()  # only the second call's lines
    with caplog.at_level(logging.INFO, logger="sdtune.training.class_images"):
        assert ensure_class_images(cfg, source) == folder
    assert "reusing 3 class image(s)" in caplog.text and "rendering" not in caplog.text
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps
    # an interrupted render (no metadata.csv, one image missing) renders only the missing one
    (folder / "metadata.csv").unlink()
    (folder / "images" / "00001.png").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdtune.training.class_images"):
        ensure_class_images(cfg, source)
    assert "rendering 1 class image(s)" in caplog.text and (folder / "images" / "00001.png").is_file()
    kept = [folder / "images" / n for n in ("00000.png", "00002.png")]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in kept)
    assert class_image_folder(_class_cfg(tmp_path, "data.class_prompt=a blue square"), source) != folder


@pytest.mark.slow
def test_a_prior_preservation_run_logs_the_prior_loss_and_leaves_the_user_folder_alone(capsys, tmp_path, dataset):
    before = snapshot(dataset)
    args = ["model=tiny", f"model.path={CACHE / 'tiny-sd15'}", f"data.root={dataset}", "trainer=cpu",
            "trainer.max_steps=2", "data.batch_size=2", "callbacks.samples=null", "data.class_prompt=a photo",
            "data.num_class_images=2", "data.class_sample_steps=2", f"paths.cache_dir={tmp_path / 'cache'}"]
    code, err = run_main(capsys, *args, f"hydra.run.dir={tmp_path / 'run1'}")
    assert code == 0, err[-3000:]
    header = (tmp_path / "run1" / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/prior_loss_epoch" in header  # logged beside train/loss
    [folder] = (tmp_path / "cache" / "class_images").iterdir()
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    code, err = run_main(capsys, *args, f"hydra.run.dir={tmp_path / 'run2'}")
    assert code == 0, err[-3000:]
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps  # nothing rendered again
    assert snapshot(dataset) == before
