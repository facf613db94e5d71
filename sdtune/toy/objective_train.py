"""Pretrain a toy base's denoiser through its family's own training objective (the flow-matching toys).

The UNet toys keep the recipe they were built with (:func:`sdtune.toy.pretrain.train_unet`:
v-prediction on the toy DDPM schedule, whose committed weights must not change). Every other
family trains here through the same interface sdtune's trainer uses and nothing else:
``family.objective(parts, train)`` draws each sample's timestep and gives the noisy input and the
target, ``family.conditioning`` and ``objective.conditioning`` build the denoiser's inputs (FLUX's
guidance value included) and ``family.predict`` runs the denoiser, all through
:func:`sdtune.training.diffusion.denoising_loss`. So a toy trains exactly as a LoRA run on it
later does, and a new flow family gets a toy without code here.

Timesteps are drawn uniformly rather than logit-normally (``FLOW``), the family scheduler's shift
still applied, as it is when sampling: in the UNet toys the noisiest steps decided a sample's
colour and shape, and the logit-normal density (made for 1024 px images, whose detail needs the
middle steps) gives those few samples. The two were not compared on the flow toys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from diffusers.training_utils import EMAModel

from sdtune.families import ModelFamily, ModelParts
from sdtune.training.diffusion import denoising_loss


def optimizer_step(loss: torch.Tensor, params: list[torch.nn.Parameter], opt, sched, ema: EMAModel) -> float:
    """One update of a toy pretraining loop (UNet and flow recipes alike): gradients clipped to norm 1,
    the schedule stepped and the EMA updated; the step's loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    ema.step(params)
    return loss.item()

log = logging.getLogger(__name__)

#: ``train.flow`` settings of the toy pretraining (the rest are the config defaults).
FLOW = {"timestep_sampling": "uniform"}


def train_denoiser(family: ModelFamily, parts: ModelParts, latents: torch.Tensor, captions: list[str], recipe,
                   progress: Callable[[str], None] = log.info) -> list[float]:
    """Train ``parts.denoiser`` (and, with ``recipe.train_text``, the text encoders) on ``latents``
    (scaled, as the objective takes them) captioned ``captions``; the averaged (EMA) weights are
    left in place. Every draw comes from generators seeded by ``recipe.seed``."""
    torch.manual_seed(recipe.seed + 2)
    objective = family.objective(parts, {"flow": dict(FLOW)})
    denoiser = parts.denoiser
    modules = [denoiser, *(parts.text_encoders if recipe.train_text else [])]
    for module in modules:
        module.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    steps, batch_size, lr = recipe.flow_steps, recipe.flow_batch, recipe.flow_lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=True)
    g = torch.Generator().manual_seed(recipe.seed + 3)
    side = torch.tensor([[recipe.side, recipe.side]])
    geometry = {"original_size": side, "crop_top_left": torch.zeros(1, 2, dtype=torch.long), "target_size": side}
    shape = tuple(latents.shape[1:])
    losses, start = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(captions), (batch_size,), generator=g)
        empty = torch.rand(batch_size, generator=g) < recipe.empty_caption
        batch_captions = ["" if e else captions[i] for i, e in zip(idx.tolist(), empty.tolist())]
        text = family.encode_prompts(parts, batch_captions)
        cond = family.conditioning(text, {k: v.expand(batch_size, -1) for k, v in geometry.items()})
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.cat([objective.draw_timestep(g, shape) for _ in range(batch_size)])
        loss = denoising_loss(family, denoiser, objective, x0, cond, noise, t, dtype=torch.float32)
        losses.append(optimizer_step(loss, params, opt, sched, ema))
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            progress(f"{family.name} denoiser step {step}/{steps} loss {recent:.4f} ({time.perf_counter() - start:.0f}s)")
    ema.copy_to(params)
    for module in modules:
        module.eval().requires_grad_(False)
    return losses
