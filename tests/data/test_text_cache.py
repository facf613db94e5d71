"""Text-encoder outputs are computed once per caption; the encoders then leave the device."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sdtune.data.cache_memory import CacheMemory
from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.records import load_records
from sdtune.data.text_cache import TextEmbeddingCache
from sdtune.families import get_family
from sdtune.training.module import LoRATrainingModule
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.models import tiny_model
from tests.helpers.paths import QUICKSTART


class CountingStep(L.Callback):
    """Counts text-encoder forward calls made inside training steps."""

    def __init__(self, encoders):
        self.in_step = False
        self.calls_in_step = 0
        self.steps = 0
        for enc in encoders:
            enc.register_forward_hook(self._hook)

    def _hook(self, *_):
        if self.in_step:
            self.calls_in_step += 1

    def on_train_batch_start(self, *_):
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, *_):
        self.in_step = False
        self.steps += 1
        encoder_params = {id(p) for enc in pl_module.parts.text_encoders for p in enc.parameters()}
        assert not encoder_params & {id(p) for p in pl_module.parameters()}  # never part of the module
        assert all(p.device.type == "cpu" for enc in pl_module.parts.text_encoders for p in enc.parameters())


@pytest.mark.parametrize(("model", "family"), [("tiny_sdxl", "sdxl"), ("tiny_kolors", "kolors")])
def test_cached_encoders_are_not_called_in_training_steps(tmp_path, model, family):
    tiny_model(family)
    cfg = compose_cfg("experiment=quickstart", f"model={model}", output_dir=tmp_path)
    module = LoRATrainingModule(resolved(cfg))
    module.setup("fit")
    counter = CountingStep(module.parts.text_encoders)
    dm = ImageCaptionDataModule(load_records(QUICKSTART), resolution=64, batch_size=4)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[counter])
    trainer.fit(module, datamodule=dm)
    assert counter.steps == 4 and counter.calls_in_step == 0
    assert module.text_cache is not None and module.text_cache.encoded == 13  # 12 captions + ""
    # what training looked up is what the encoders give
    captions = [r.text for r in load_records(QUICKSTART)[:3]]
    cached = module.text_cache.lookup(captions, torch.device("cpu"))
    direct = module.family.encode_prompts(module.parts, captions)
    for k in direct:
        torch.testing.assert_close(cached[k], direct[k])


def test_uncached_mode_encodes_every_step(tmp_path):
    cfg = compose_cfg("experiment=quickstart", "train.cache_text_embeddings=false", output_dir=tmp_path)
    module = LoRATrainingModule(resolved(cfg))
    module.setup("fit")
    counter = CountingStep([])
    calls = []
    module.parts.text_encoders[0].register_forward_hook(lambda *_: calls.append(1))
    dm = ImageCaptionDataModule(load_records(QUICKSTART), resolution=64, batch_size=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[counter])
    trainer.fit(module, datamodule=dm)
    assert module.text_cache is None and len(calls) == 3


def test_disk_cache_is_reused_and_keyed_by_what_changes_the_values(tmp_path):
    family = get_family("sd15")
    parts = family.load(str(tiny_model("sd15")))
    caps = ["a red circle", "二次元"]
    first = TextEmbeddingCache(family, parts, model_key="m@None", dtype=torch.float32, disk_dir=tmp_path)
    first.fill(caps)
    assert first.encoded == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert first.read == 0 and set(first.rows) == set(caps)  # just encoded: held without reading back
    second = TextEmbeddingCache(family, parts, model_key="m@None", dtype=torch.float32, disk_dir=tmp_path)
    second.fill(caps)
    assert second.encoded == 0 and second.read == 2  # read back from disk, once
    direct = family.encode_prompts(parts, caps)
    for _ in range(2):
        looked_up = second.lookup([caps[1], caps[0], caps[1]], torch.device("cpu"))
        for k, v in direct.items():
            torch.testing.assert_close(looked_up[k], v[[1, 0, 1]])
    assert second.read == 2  # lookups never open a file
    per_use = TextEmbeddingCache(family, parts, model_key="m@None", dtype=torch.float32, disk_dir=tmp_path,
                                 memory=CacheMemory("cpu", "disk"))
    per_use.fill(caps)
    assert per_use.rows == {} and per_use.lookup(caps, torch.device("cpu")).keys() == direct.keys()
    assert per_use.read == 1 + 2  # data.cache_memory=disk: the size probe, then every lookup reads
    other_model = TextEmbeddingCache(family, parts, model_key="other@None", dtype=torch.float32, disk_dir=tmp_path)
    other_dtype = TextEmbeddingCache(family, parts, model_key="m@None", dtype=torch.float16, disk_dir=tmp_path)
    assert len({first.key("x"), other_model.key("x"), other_dtype.key("x"), first.key("y")}) == 4
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        first.lookup(["never filled"], torch.device("cpu"))
