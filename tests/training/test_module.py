"""The LightningModule on the tiny SD1.5: what trains, what stays frozen, what is saved."""

from __future__ import annotations

import lightning as L
import torch

from sdtune.data.collate import collate
from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.records import load_records
from sdtune.lora.layers import is_lora_key
from sdtune.training.module import LoRATrainingModule
from tests.helpers.config import compose_cfg, resolved


def _module(tmp_path, data_root, *overrides) -> LoRATrainingModule:
    cfg = compose_cfg("experiment=quickstart", f"data.root={data_root}", *overrides, output_dir=tmp_path)
    module = LoRATrainingModule(resolved(cfg))
    module.setup("fit")
    return module


def _loss(module, batch, seed: int) -> torch.Tensor:
    """The loss on ``batch`` with latents, noise and timesteps drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    latents = module.batch_latents(batch, deterministic=True)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    return module.diffusion_loss(latents, module.encode_text(batch["text"]), batch, noise=noise, timesteps=timesteps)


def _fixed_loss(module, batch) -> float:
    """Loss on a fixed batch with fixed noise and timesteps."""
    with torch.no_grad():
        return _loss(module, batch, 1234).item()


def _fit(module, data_root, steps: int, batch_size: int = 1):
    dm = ImageCaptionDataModule(load_records(data_root), resolution=64, batch_size=batch_size)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def test_single_image_overfit_changes_only_lora(tmp_path, tiny_sd15, one_image_data):
    L.seed_everything(0)
    module = _module(tmp_path, one_image_data, "optim.optimizer.lr=3e-2")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    records = load_records(one_image_data)
    from sdtune.data.datamodule import ImageCaptionDataset

    item = ImageCaptionDataset(records, 64)[0]
    batch = collate([item] * 8)
    loss_before = _fixed_loss(module, batch)

    _fit(module, one_image_data, steps=30)

    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(is_lora_key(k) for k in changed), sorted(changed)[:5]
    frozen = [k for k in before if not is_lora_key(k)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # bit-identical
    assert all(not p.requires_grad for n, p in module.named_parameters() if not is_lora_key(n))
    loss_after = _fixed_loss(module, batch)
    assert loss_after < loss_before * 0.95, (loss_before, loss_after)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_sd15):
    grads = []
    for gc in (False, True):
        L.seed_everything(0)
        module = _module(tmp_path, "examples/quickstart", f"train.gradient_checkpointing={gc}", "lora.init=gaussian")
        assert module.parts.unet.is_gradient_checkpointing == gc
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        batch = collate([ImageCaptionDatasetItem()] * 2)
        loss = _loss(module, batch, 5)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def ImageCaptionDatasetItem():
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(3, 64, 64, generator=g) * 2 - 1, "text": "a red circle",
            "original_size": torch.tensor([64, 64]), "crop_top_left": torch.tensor([0, 0]), "target_size": torch.tensor([64, 64])}


def test_mixed_precision_keeps_lora_in_fp32(tmp_path, tiny_sd15):
    module = _module(tmp_path, "examples/quickstart", "trainer.precision=bf16-mixed")
    lora = [p for n, p in module.named_parameters() if is_lora_key(n)]
    frozen = [p for n, p in module.named_parameters() if not is_lora_key(n)]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
