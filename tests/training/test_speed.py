"""Each speed switch does what it says, and the loss on a fixed batch stays that of the default path.

Every comparison uses two LoRATrainingModules on the tiny SD1.5 with identical weights (the LoRA
of one is loaded into the other), a batch from the real datamodule, and explicit noise and
timesteps, so the only difference between the two losses is the switch. Timings belong in
``make bench``, not here.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.records import load_records
from sdtune.training.module import LoRATrainingModule
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg, resolved

HAS_CUDA = torch.cuda.is_available()


def _cfg(tmp_path, *overrides) -> dict:
    return resolved(compose_cfg("experiment=quickstart", "lora.rank=8", "data.batch_size=2", *overrides, output_dir=tmp_path))


def _module(cfg: dict, like: LoRATrainingModule | None = None) -> LoRATrainingModule:
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    if like is not None:
        missing, unexpected = module.load_state_dict(like.state_dict(), strict=False)
        assert not unexpected and not [k for k in missing if "lora" in k]
    return module


def _batch(cfg: dict) -> dict:
    datamodule = ImageCaptionDataModule.from_config(load_records(cfg["data"]["root"]), cfg["data"], seed=0)
    return next(iter(datamodule.train_dataloader()))


def _loss(module: LoRATrainingModule, batch: dict, *, grad: bool = False) -> torch.Tensor:
    """The training loss with fixed noise and timesteps (no randomness left)."""
    latents = module.batch_latents(batch, deterministic=True)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.tensor([50, 900][: latents.shape[0]])
    with torch.set_grad_enabled(grad):
        return module.diffusion_loss(latents, module.encode_text(batch["text"]), batch, noise=noise, timesteps=timesteps)


@pytest.fixture(scope="module")
def default(tmp_path_factory, tiny_sd15):
    """The default path: its config, module and a fixed batch."""
    cfg = _cfg(tmp_path_factory.mktemp("speed"))
    module = _module(cfg)
    with torch.no_grad():  # non-zero LoRA so that it takes part in the loss
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    batch = _batch(cfg)
    return cfg, module, batch, _loss(module, batch).item()


def test_sdpa_attention_is_attnprocessor2_0_and_matches_plain_attention(tmp_path, default):
    _, module, batch, loss = default
    processors = module.parts.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    plain = _module(_cfg(tmp_path), like=module)
    plain.parts.unet.set_attn_processor(AttnProcessor())  # diffusers' unfused softmax(QK^T)V
    assert _loss(plain, batch).item() == pytest.approx(loss, rel=1e-5)


def test_channels_last_formats_the_convolutions_and_keeps_the_loss(tmp_path, default):
    _, base, batch, loss = default
    module = _module(_cfg(tmp_path, "speed.channels_last=true"), like=base)
    def nhwc(model):  # 3x3 (and larger) kernels: 1x1 ones are laid out the same either way
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        assert weights
        return [w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights]

    assert all(nhwc(module.parts.unet)) and all(nhwc(module.parts.vae))
    assert not any(nhwc(base.parts.unet))
    assert _loss(module, batch).item() == pytest.approx(loss, rel=1e-5)


def test_gradient_checkpointing_is_on_and_keeps_the_loss(tmp_path, default):
    _, base, batch, loss = default
    module = _module(_cfg(tmp_path, "train.gradient_checkpointing=true"), like=base)
    assert module.parts.unet.is_gradient_checkpointing and not base.parts.unet.is_gradient_checkpointing
    value = _loss(module, batch, grad=True)
    value.backward()  # checkpointed blocks recompute in backward; it must still reach the LoRA
    assert value.item() == pytest.approx(loss, rel=1e-5)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora" in n)


def test_tf32_switch_sets_the_backend_flags_and_keeps_the_loss(tmp_path, default):
    _, base, batch, loss = default
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        module = _module(_cfg(tmp_path, "speed.tf32=true"), like=base)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert _loss(module, batch).item() == pytest.approx(loss, rel=1e-5)  # CPU: no effect at all
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        _module(_cfg(tmp_path, "speed.tf32=false"), like=base)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")  # no GPU here: pinning is a no-op
def test_dataloader_workers_and_pin_memory_serve_the_same_batch(tmp_path, default):
    cfg, base, batch, loss = default
    fast = _cfg(tmp_path, "data.num_workers=2", "data.pin_memory=true")
    datamodule = ImageCaptionDataModule.from_config(load_records(fast["data"]["root"]), fast["data"], seed=0)
    loader = datamodule.train_dataloader()
    assert loader.num_workers == 2 and loader.pin_memory and loader.persistent_workers
    first = next(iter(loader))
    assert first["text"] == batch["text"]
    torch.testing.assert_close(first["pixel_values"], batch["pixel_values"], rtol=0, atol=0)
    assert _loss(base, first).item() == pytest.approx(loss, rel=1e-6)


def test_fused_adamw_is_selected_and_takes_the_same_step(tmp_path, default):
    _, base, batch, _ = default
    results = {}
    for fused in ("null", "true"):
        module = _module(_cfg(tmp_path, f"optim.optimizer.fused={fused}", "trainer.max_steps=1"), like=base)
        module.trainer = _FakeTrainer()
        optimizer = module.configure_optimizers()["optimizer"]
        _loss(module, batch, grad=True).backward()
        optimizer.step()
        results[fused] = (optimizer.defaults["fused"], _loss(module, batch).item())
    assert results["null"][0] is HAS_CUDA  # null: the fused kernel exactly when training on CUDA
    assert results["true"][0] is True  # torch >= 2.4 has a fused AdamW for the CPU as well
    assert results["true"][1] == pytest.approx(results["null"][1], rel=1e-5)


class _FakeTrainer:
    """configure_optimizers reads the step count for the LR schedule; nothing else of a Trainer."""

    estimated_stepping_batches = 1


def test_xformers_is_selected_and_refused_clearly_without_it(tmp_path, default):
    cfg = _cfg(tmp_path, "speed.attention=xformers")
    assert cfg["speed"]["attention"] == "xformers"
    if importlib.util.find_spec("xformers") is not None and HAS_CUDA:
        module = _module(cfg, like=default[1])
        assert "XFormers" in type(next(iter(module.parts.unet.attn_processors.values()))).__name__
        return
    with pytest.raises(ConfigError, match="xformers"):
        _module(cfg)


def test_adamw8bit_is_selected_and_needs_bitsandbytes(tmp_path, default):
    cfg = _cfg(tmp_path, "optim=adamw8bit")
    assert cfg["optim"]["optimizer"]["_target_"] == "bitsandbytes.optim.AdamW8bit"
    module = _module(cfg, like=default[1])
    module.trainer = _FakeTrainer()
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(Exception, match="bitsandbytes"):  # names the missing package
            module.configure_optimizers()
        return
    if not HAS_CUDA:
        pytest.skip("bitsandbytes is installed but 8-bit AdamW needs a CUDA GPU, and this machine has none")
    assert type(module.configure_optimizers()["optimizer"]).__name__ == "AdamW8bit"


@pytest.mark.slow
def test_compile_compiles_the_unet_in_place_and_keeps_the_loss(tmp_path, default):
    _, base, batch, loss = default
    module = _module(_cfg(tmp_path, "speed.compile=true"), like=base)
    unet = module.parts.unet
    assert unet._compiled_call_impl is not None and base.parts.unet._compiled_call_impl is None
    assert any("lora_A" in n for n, _ in unet.named_parameters())  # names unchanged: checkpoints still load
    assert _loss(module, batch).item() == pytest.approx(loss, rel=1e-4)
