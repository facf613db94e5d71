"""Caches read once into memory, in the training dtype (issue 16): no training step opens a cache file.

Real Lightning fits on the tiny SD1.5 with ``data.cache_latents`` and a disk text cache; every read
of a cache file (safetensors' ``safe_open``, which ``load_file`` uses, and ``open``) is counted
per phase: the fill at fit start, then each epoch.
"""

from __future__ import annotations

import builtins
import pickle
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch

from sdtune.data.cache_memory import CacheMemory
from sdtune.data.collate import collate
from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.latents import LatentStore
from sdtune.data.records import load_records
from sdtune.lora.layers import live_lora_state
from sdtune.run.checks import validate
from sdtune.training.module import LoRATrainingModule
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.paths import QUICKSTART


class CacheReads(L.Callback):
    """Counts opens of files under ``folders`` per phase ("fill", then the epoch number) and keeps
    every training loss, by patching the two ways a file is opened for reading."""

    def __init__(self, monkeypatch, *folders: Path):
        self.folders = [str(f) for f in folders]
        self.phase: str | int = "fill"
        self.reads: Counter = Counter()
        self.losses: list[float] = []
        safe_open, real_open = safetensors.torch.safe_open, builtins.open

        def counted_safe_open(path, *args, **kwargs):
            self._count(path)
            return safe_open(path, *args, **kwargs)

        def counted_open(path, mode="r", *args, **kwargs):
            if not set(mode) & set("wax+"):  # reading, not writing (atomic_path fsyncs with rb+)
                self._count(path)
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(safetensors.torch, "safe_open", counted_safe_open)
        monkeypatch.setattr(builtins, "open", counted_open)

    def _count(self, path) -> None:
        if isinstance(path, (str, Path)) and any(str(path).startswith(f) for f in self.folders):
            self.reads[self.phase] += 1

    def on_train_epoch_start(self, trainer, *_):
        self.phase = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, *_):
        self.losses.append(outputs["loss"].item())


def fit(tmp_path, monkeypatch, *overrides: str, epochs: int = 2):
    latents, text = tmp_path / "latents", tmp_path / "text"
    cfg = resolved(compose_cfg("experiment=quickstart", "data.cache_latents=true", f"data.latent_cache_dir={latents}",
                               f"train.text_cache_dir={text}", "data.val_images=1", *overrides, output_dir=tmp_path))
    L.seed_everything(0)
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    reads = CacheReads(monkeypatch, latents, text)
    dm = ImageCaptionDataModule.from_config(load_records(QUICKSTART), cfg["data"], seed=cfg["seed"])
    trainer = L.Trainer(max_epochs=epochs, max_steps=-1, accelerator="cpu", precision=cfg["trainer"]["precision"],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[reads])
    trainer.fit(module, datamodule=dm)
    monkeypatch.undo()
    return module, dm, reads


@pytest.mark.slow
@pytest.mark.parametrize("where", ["cpu", "device"])
def test_the_second_epoch_reads_no_cache_file_and_caches_hold_the_training_dtype(tmp_path, monkeypatch, where):
    """Acceptance 2. ``cpu``: the data loader serves rows of the store; ``device``: batches carry
    rows and the module gathers them (the GPU path, on the CPU here). Catches a store that reads
    files per sample, a text cache that reads per batch, and caches kept in fp32 under bf16."""
    over = ["trainer.precision=bf16-mixed", f"data.cache_memory={where}"]
    _, _, first = fit(tmp_path, monkeypatch, *over, epochs=1)
    assert sum(first.reads.values()) == 0  # just encoded: held without reading the files back
    module, dm, reads = fit(tmp_path, monkeypatch, *over)
    assert len(reads.losses) == 6  # 12 images, batch 4, two epochs
    assert reads.reads["fill"] == 12 + 13  # every latent and text row (12 captions and "") read once
    assert reads.reads[0] == 0 and reads.reads[1] == 0, dict(reads.reads)
    store = dm.latent_store
    assert store is not None and len(store) == 12 and store.on_device == (where == "device")
    assert (module.latent_store is store) and store.groups[0]["latent_params"].dtype == torch.bfloat16
    assert module.weight_dtype == torch.bfloat16
    assert {t.dtype for t in module.text_cache.table.values()} == {torch.bfloat16}
    assert len(module.text_cache.rows) == 13 and module.text_cache.on_disk == set()
    sample = dm.dataset[(0, 0)]  # what a data-loader worker hands over
    assert ("latent_index" in sample) == (where == "device") and ("latent_params" in sample) == (where == "cpu")


@pytest.mark.slow
def test_in_memory_caches_train_bit_exact_like_reading_the_files_each_step(tmp_path, monkeypatch):
    """fp32: held in memory (either serving path) gives the very losses and LoRA weights of reading
    every latent and text row from its file at each use (``data.cache_memory=disk``, the old way)."""
    runs = {}
    for where in ("disk", "cpu", "device"):
        module, _, reads = fit(tmp_path, monkeypatch, f"data.cache_memory={where}")
        runs[where] = (reads.losses, live_lora_state(module.parts.unet), reads.reads)
    assert runs["disk"][2][1] > 0 and runs["cpu"][2][1] == runs["device"][2][1] == 0  # the instrument counts
    for where in ("cpu", "device"):
        assert runs[where][0] == runs["disk"][0]
        assert all(torch.equal(runs[where][1][k], v) for k, v in runs["disk"][1].items())


def test_placement_shares_one_device_budget_and_refuses_bad_settings(tmp_path):
    memory = CacheMemory(torch.device("meta"), "auto", budget_gb=1.0)  # a non-CPU device with a 1 GiB budget
    assert memory.place(600 * 2**20, "latents") == "device"
    assert memory.place(600 * 2**20, "text") == "cpu"  # both would not fit: the second goes to CPU memory
    assert memory.place(400 * 2**20, "text") == "device" and memory.used == 1000 * 2**20
    assert CacheMemory(torch.device("cpu"), "auto").place(1, "x") == "cpu"  # a CPU run: served by the loader
    assert CacheMemory(torch.device("cpu"), "disk").place(1, "x", on_disk=False) == "cpu"  # no files to read
    for override, message in [("data.cache_memory=gpu", "data.cache_memory must be one of auto, device, cpu, disk"),
                              ("data.cache_budget_gb=-1", "data.cache_budget_gb must be a finite number")]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_cfg("experiment=quickstart", override, output_dir=tmp_path))


def test_a_device_store_gathers_batches_by_row_and_never_pickles_its_tensors():
    entries = {f"k{i}": {"latent_params": torch.full((8, 2, 2), float(i)), "mask": torch.full((1, 2, 2), i / 10)}
               for i in range(3)}
    entries["wide"] = {"latent_params": torch.zeros(8, 2, 4), "mask": torch.ones(1, 2, 4)}  # another bucket
    store = LatentStore(entries, dtype=torch.float16, on_device=True)
    assert len(store.groups) == 2 and store.where["wide"] == (1, 0)
    batch = collate([{"latent_index": store.serve(k)["latent_index"], "text": k, "seed": torch.tensor(0)}
                     for k in ("k2", "k0", "k2")])
    assert batch["latent_group"] == 0 and batch["latent_row"].tolist() == [2, 0, 2]
    out = store.gather(batch["latent_group"], batch["latent_row"])
    assert out["latent_params"].dtype == torch.float16 and out["latent_params"][:, 0, 0, 0].tolist() == [2.0, 0.0, 2.0]
    assert out["latent_mask"][:, 0, 0, 0].tolist() == pytest.approx([0.2, 0.0, 0.2], abs=1e-3)
    worker_copy = pickle.loads(pickle.dumps(store))  # what a spawned data-loader worker receives
    assert worker_copy.groups is None and worker_copy.serve("k1") == {"latent_index": (0, 1)}
    with pytest.raises(ValueError, match="mixes cached latents of different shapes"):
        collate([{"latent_index": store.serve(k)["latent_index"], "text": k} for k in ("k0", "wide")])


def test_captions_encoded_every_step_are_tokenized_once(tmp_path):
    """train.cache_text_embeddings=false: the module's embeddings equal encode_prompts exactly,
    and a caption seen before is not tokenized again."""
    cfg = resolved(compose_cfg("experiment=quickstart", "train.cache_text_embeddings=false", output_dir=tmp_path))
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    captions = ["a red circle", "a blue square", "a red circle"]
    with torch.no_grad():
        first = module.encode_text(captions)
        again = module.encode_text(captions[1:])
        direct = module.family.encode_prompts(module.parts, captions)
    assert module.tokens.tokenized == 2
    assert torch.equal(first["encoder_hidden_states"], direct["encoder_hidden_states"])
    torch.testing.assert_close(again["encoder_hidden_states"], direct["encoder_hidden_states"][1:])


def test_prior_preservation_batches_gather_instance_and_class_latents_from_one_store(tmp_path):
    """Instance and class images share one device store, so a doubled batch is one gather whose
    rows are each sample's own latent (a stand-in encoder makes each image's latent its mean colour)."""
    from sdtune.data.collate import collate_prior
    from sdtune.data.latents import LatentCache
    from sdtune.data.prior import PriorPreservationDataset

    records = load_records(QUICKSTART)
    dm = ImageCaptionDataModule(records[:6], resolution=32, class_records=records[6:])

    def encode(pixels):  # (B, 3, 32, 32) -> (B, 8, 4, 4)
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 3, 1, 1)[:, :8]

    assert dm.prepare_latents(encode, LatentCache(tmp_path, "m"), memory=CacheMemory("cpu", "device"),
                              dtype=torch.float64) == 12
    store = dm.latent_store
    assert store.on_device and len(store) == 12 and len(store.groups) == 1
    prior = PriorPreservationDataset(dm.dataset, dm.class_dataset)
    batch = collate_prior([prior[(i, 100 + i)] for i in range(3)])
    got = store.gather(batch["latent_group"], batch["latent_row"])["latent_params"]
    instance = [encode(dm.dataset.pixels(i, False)[0][None])[0] for i in range(3)]
    classes = [encode(dm.class_dataset.pixels(prior.pick(100 + i)[0], False)[0][None])[0] for i in range(3)]
    assert got.dtype == torch.float64 and torch.equal(got, torch.stack(instance + classes).double())
