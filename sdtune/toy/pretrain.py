"""Pretrain the toy base models: one shared VAE, then each family's UNet and text encoders.

The architectures are sdtune's tiny miniatures (real diffusers and transformers classes), built
and saved as a diffusers folder and loaded back through the family's ordinary ``load``, exactly as
a real model is. What is trained:

1. the VAE, on shapes in arbitrary RGB colours, so it can carry any flat colour (the LoRA concept
   colours included) and its latent scale is set the way SD's is (1 / latent std);
2. each UNet together with its family's text encoder(s), with the v-prediction loss (see
   ``TOY_SCHEDULE``) on captioned palette scenes, 10% of them with the empty caption so
   classifier-free guidance works. The encoders are trained too: random ones give every caption a
   distinct embedding, but captions that differ only in which colour is the shape's and which the
   background's come out 93-98% alike, and a UNet this small then mixes the two up (81% of
   prompted colours right with trained encoders against 67% with random ones, same UNet budget).
   Words the pretraining captions never use (the trigger words) keep their random embeddings,
   which is why those are drawn large (``token_embedding_std``, 0.3 instead of the library's
   0.02): in a real encoder every token's embedding is trained and carries its identity into the
   hidden states. At 0.02 an untrained token is a few percent of the residual stream after one
   layer, the toy ChatGLM then gives ``sks`` and ``olq`` 91-100% alike hidden states at their
   positions, and a Kolors LoRA teaches both triggers one blend of the two colours; at 0.3 they
   are 7-23% alike and each trigger keeps its own colour.

Everything draws from ``torch.Generator``/``random.Random`` seeded from one seed, on one thread
count with deterministic algorithms, so a rerun on the same machine and library versions
reproduces the weights.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from sdtune.data.images import to_tensor
from sdtune.families import ModelParts, get_family
from sdtune.families.objectives import DDPMObjective
from sdtune.toy.domain import random_colour_image, random_scene, render
from sdtune.toy.objective_train import optimizer_step, train_denoiser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How the toy weights are made; written into each folder's ``sdtune_toy.json``."""

    seed: int = 0
    side: int = 64
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    scenes: int = 3000
    unet_steps: int = 2200
    unet_batch: int = 32
    unet_lr: float = 1e-3
    empty_caption: float = 0.1
    ema_decay: float = 0.999
    train_text: bool = True
    token_embedding_std: float | None = 0.3
    threads: int = 2
    # The 16-channel VAE (FLUX, SD3) is the 4-channel one widened (sdtune.toy.widen), then fine-tuned.
    vae16_steps: int = 300
    vae16_batch: int = 8
    vae16_lr: float = 2e-4
    # It and the flow toys train on one thread: they were built on a 2-core machine shared with other
    # jobs, where two threads ran 7x slower than one (each waits on the other at every op).
    flow_threads: int = 1
    # The families trained through their own objective (flow matching): sdtune.toy.objective_train.
    flow_steps: int = 2200
    flow_batch: int = 16
    flow_lr: float = 1e-3


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def toy_vae(latent_channels: int = 4):
    """An AutoencoderKL sized for 64 px flat-colour images, initialised so it can learn colours fast.

    GroupNorm removes each sample's mean and scale, which in a small network erases the very
    thing a flat-colour image is made of. Two channels of ``conv_in`` start as large constants of
    opposite sign (+/-20): they dominate every norm's statistics, so each norm starts as a nearly
    fixed affine map and absolute colour survives to the latents and back. One norm group over all
    channels keeps that true everywhere. The log-variance starts at -8, so the encoder starts
    nearly deterministic rather than drowning its latents in unit noise.

    ``latent_channels=16`` is the FLUX / SD3 layout: no quant convs, so the log-variance half of
    the encoder's ``conv_out`` starts at -8 instead of ``quant_conv``'s.
    """
    from diffusers import AutoencoderKL

    sd_layout = latent_channels == 4  # SD's 4-channel VAE has quant convs, FLUX's and SD3's 16-channel one none
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, sample_size=64, scaling_factor=1.0,
        **({} if sd_layout else {"use_quant_conv": False, "use_post_quant_conv": False}),
    )
    with torch.no_grad():
        latent = vae.config.latent_channels
        moments = vae.quant_conv if sd_layout else vae.encoder.conv_out
        moments.weight[latent:].zero_()
        moments.bias[latent:].fill_(-8.0)
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight[-2:].zero_()
            conv.bias[-2].fill_(20.0)
            conv.bias[-1].fill_(-20.0)
    return vae


def train_vae(recipe: Recipe, progress: Callable[[str], None] = log.info, latent_channels: int = 4, init=None):
    """The toy AutoencoderKL, trained to reconstruct shapes in any colour (from ``init``'s weights if
    given); scaling factor set (and, for the 16-channel layout, the shift factor, as FLUX's and SD3's VAEs have)."""
    torch.manual_seed(recipe.seed)
    vae = (toy_vae(latent_channels) if init is None else init).train().requires_grad_(True)
    rng = random.Random(recipe.seed)
    steps, batch, lr = ((recipe.vae_steps, recipe.vae_batch, recipe.vae_lr) if latent_channels == 4
                        else (recipe.vae16_steps, recipe.vae16_batch, recipe.vae16_lr))
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    for step in range(steps):
        x = torch.stack([to_tensor(random_colour_image(rng, recipe.side)) for _ in range(batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample  # the small std it keeps adds nothing but noise here
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            progress(f"vae{latent_channels} step {step}/{steps} loss {loss.item():.5f} ({time.perf_counter() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = torch.stack([to_tensor(random_colour_image(rng, recipe.side)) for _ in range(256)])
        mean = vae.encode(x).latent_dist.mean
    if latent_channels == 4:
        vae.register_to_config(scaling_factor=round(1.0 / mean.std().item(), 5))  # latents of unit variance, as SD does
    else:  # zero mean too, as FLUX's and SD3's shift_factor does
        vae.register_to_config(shift_factor=round(mean.mean().item(), 5), scaling_factor=round(1.0 / mean.std().item(), 5))
    return vae


@torch.no_grad()
def encode_scenes(vae, recipe: Recipe) -> tuple[torch.Tensor, list[str]]:
    """Latent means (scaled) and captions of ``recipe.scenes`` palette scenes."""
    rng = random.Random(recipe.seed + 1)
    scenes = [random_scene(rng) for _ in range(recipe.scenes)]
    latents = []
    for i in range(0, len(scenes), 64):
        x = torch.stack([to_tensor(render(s, recipe.side)) for s in scenes[i : i + 64]])
        mean = vae.encode(x).latent_dist.mean
        if vae.config.shift_factor is not None:
            mean = mean - vae.config.shift_factor
        latents.append(mean * vae.config.scaling_factor)
    return torch.cat(latents), [s.caption() for s in scenes]


@torch.no_grad()
def encode_captions(family, parts: ModelParts, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each distinct caption's encoder outputs (row tensors), the empty caption included."""
    unique = sorted(set(captions) | {""})
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(0, len(unique), 32):
        chunk = unique[i : i + 32]
        encoded = family.encode_prompts(parts, chunk)
        for j, caption in enumerate(chunk):
            out[caption] = {k: v[j] for k, v in encoded.items()}
    return out


def train_unet(family, parts: ModelParts, latents: torch.Tensor, captions: list[str], recipe: Recipe,
               progress: Callable[[str], None] = log.info) -> list[float]:
    """v-prediction training of ``parts.denoiser`` (and the text encoders), conditioned through the family's interface."""
    torch.manual_seed(recipe.seed + 2)
    unet, scheduler = parts.denoiser, parts.noise_scheduler
    modules = [unet, *(parts.text_encoders if recipe.train_text else [])]
    for module in modules:
        module.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    text = None if recipe.train_text else encode_captions(family, parts, captions)
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.unet_lr, total_steps=recipe.unet_steps, pct_start=0.05)
    ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=True)
    g = _generator(recipe.seed + 3)
    side = torch.tensor([[recipe.side, recipe.side]])
    geometry = {"original_size": side, "crop_top_left": torch.zeros(1, 2, dtype=torch.long), "target_size": side}
    losses, start = [], time.perf_counter()
    for step in range(recipe.unet_steps):
        idx = torch.randint(0, len(captions), (recipe.unet_batch,), generator=g)
        empty = torch.rand(recipe.unet_batch, generator=g) < recipe.empty_caption
        batch_captions = ["" if e else captions[i] for i, e in zip(idx.tolist(), empty.tolist())]
        if text is None:
            batch_text = family.encode_prompts(parts, batch_captions)
        else:
            rows = [text[c] for c in batch_captions]
            batch_text = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        batch = {k: v.expand(recipe.unet_batch, -1) for k, v in geometry.items()}
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.unet_batch,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, **family.conditioning(batch_text, batch)).sample
        target = scheduler.get_velocity(x0, noise, t)
        # Plain v-MSE, no min-SNR weights: those scale the noisiest steps by ~SNR (near 0 here),
        # and those are the steps where a sample's shape and colour are decided.
        loss = F.mse_loss(pred, target)
        losses.append(optimizer_step(loss, params, opt, sched, ema))
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            progress(f"{family.name} unet step {step}/{recipe.unet_steps} loss {recent:.4f} ({time.perf_counter() - start:.0f}s)")
    ema.copy_to(params)  # the averaged weights draw cleaner after a short run
    for module in modules:
        module.eval().requires_grad_(False)
    return losses


# The toy schedule. On 8x8 latents SD's scaled-linear betas leak the image's mean colour through
# the noise at t=T (sqrt(alpha_bar_T) = 0.068), so a model learns to take its colour from the
# starting noise. DDPM's linear betas end near zero SNR (0.006), and "trailing" spacing starts
# sampling at t=T. At that noise level an epsilon-predicting UNet this small cannot say what the
# image is (its x0 estimate divides its error by sqrt(alpha_bar)); predicting v (Salimans & Ho
# 2022, as SD 2.x does) makes it predict the image itself there.
TOY_SCHEDULE = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "timestep_spacing": "trailing",
                "prediction_type": "v_prediction"}


def _set_toy_schedule(folder: Path) -> None:
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(TOY_SCHEDULE)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def uses_toy_schedule(family) -> bool:
    """Whether ``family``'s toy is a UNet trained by :func:`train_unet` on :data:`TOY_SCHEDULE`
    (DDPM families), rather than through the family's own objective (:mod:`sdtune.toy.objective_train`)."""
    return issubclass(family.objective_class, DDPMObjective)


def build_toy(family_name: str, out: Path, vae, latents: torch.Tensor, captions: list[str], recipe: Recipe,
              progress: Callable[[str], None] = log.info) -> Path:
    """Build ``family_name``'s toy architecture, train its denoiser, save the toy model folder at ``out``."""
    import shutil
    import tempfile

    family = get_family(family_name)
    ddpm = uses_toy_schedule(family)
    with tempfile.TemporaryDirectory() as tmp:
        family.build_toy_folder(Path(tmp))  # random weights, real layout (seeded inside)
        if ddpm:
            _set_toy_schedule(Path(tmp))
        parts = family.load(tmp)
        parts.vae = vae
        for i, encoder in enumerate(parts.text_encoders):
            encoder.eval().requires_grad_(False)
            if recipe.token_embedding_std:  # see the module docstring: untrained tokens stay distinct
                with torch.no_grad():
                    weight = encoder.get_input_embeddings().weight
                    g = _generator(recipe.seed + 10 + i)
                    weight.copy_(torch.randn(weight.shape, generator=g) * recipe.token_embedding_std)
        (train_unet if ddpm else train_denoiser)(family, parts, latents, captions, recipe, progress)
        staging = out.with_name(f".{out.name}.building")
        shutil.rmtree(staging, ignore_errors=True)
        pipe = family.build_pipeline(parts)
        pipe.to(torch.float16)  # half the bytes in git; loading with torch_dtype=float32 upcasts
        pipe.save_pretrained(staging)
        for config in staging.glob("*/config.json"):  # the temporary build path is no fact about the model
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(staging / "scheduler")
        shutil.copytree(Path(tmp) / "scheduler", staging / "scheduler")  # the schedule it was trained with
        index = json.loads((staging / "model_index.json").read_text())
        index["scheduler"] = json.loads((Path(tmp) / "model_index.json").read_text())["scheduler"]
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (staging / "sdtune_toy.json").write_text(json.dumps({"family": family_name, "recipe": recipe.__dict__}, indent=2) + "\n")
    if out.exists():  # only ever a toy folder this function made
        if not (out / "sdtune_toy.json").is_file():
            raise FileExistsError(f"{out} exists and is not a toy model folder; refusing to replace it")
        shutil.rmtree(out)
    staging.rename(out)
    return out
