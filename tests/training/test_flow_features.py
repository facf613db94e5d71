"""The training features on the flow-matching families (issue 27), on their tiny models (16-channel
VAE with a shift_factor, a transformer on 2x2 latent patches), each by its numbers in a few 64 px steps
through ``python -m sdtune``: the text and latent caches train to the losses of no cache; buckets
of two aspect ratios reach the transformer; a mask of ones is no mask and a half mask halves the
loss; prior preservation renders its class images with the family's pipeline and logs the class
loss; the EMA is the by-hand EMA and is what the run exports; the NaN guard stops (or skips).
Exact resume is tests/run/test_resume_methods.py, parametrized over the same models. A new flow
family's tiny model joins by one line in FLOW_MODELS."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from PIL import Image

from sdtune.families import get_family
from sdtune.lora.files import read_lora
from sdtune.lora.layers import lora_tensors
from sdtune.training.checkpointing import load_checkpoint
from sdtune.training.diffusion import batch_latents
from tests.helpers.cli import run_main
from tests.helpers.models import tiny_model
from tests.helpers.paths import CACHE, QUICKSTART

pytestmark = pytest.mark.slow
RUN = ("experiment=quickstart", "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0",
       "+callbacks.record._target_=tests.training.test_flow_features.Record")


@dataclass(frozen=True)
class FlowModel:
    model: str  # conf/model/<model>.yaml
    family: str
    lora_modules: int  # Linear modules of the tiny denoiser the family's default targets reach
    vae: tuple[float, float]  # the VAE's shift_factor and scaling_factor (the full-size model's)

    def args(self) -> tuple[str, ...]:
        return f"model={self.model}", f"model.path={CACHE / f'tiny-{self.family}'}", "lora.targets=null"


FLOW_MODELS = [FlowModel("tiny_sd35", "sd35", 19, (0.0609, 1.5305))]


@pytest.fixture(params=FLOW_MODELS, ids=lambda m: m.model)
def flow(request) -> FlowModel:
    tiny_model(request.param.family)
    return request.param


class Record(L.Callback):
    """Each training step's loss and the shape of what the step encoded (pixels or cached latent
    parameters), kept on the class: the run instantiates it from the config."""

    runs: list[Record] = []

    def __init__(self):
        self.losses: list[float] = []
        self.shapes: list[tuple[int, ...]] = []
        Record.runs.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append(tuple((batch.get("pixel_values", batch.get("latent_params"))).shape))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = (outputs or {}).get("loss")  # a skipped (non-finite) step returns none
        self.losses.append(float("nan") if loss is None else loss.item())


def _train(capsys, flow: FlowModel, run, *overrides: str) -> Record:
    code, err = run_main(capsys, *RUN, *flow.args(), *overrides, f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    return Record.runs[-1]


def _lora(flow: FlowModel, run, name: str = "last") -> dict[str, torch.Tensor]:
    """The checkpoint's peft-named LoRA tensors (the module's attribute is the family's denoiser subfolder)."""
    state = load_checkpoint(run / "checkpoints" / f"{name}.ckpt")["state_dict"]
    return lora_tensors(state, prefix=f"{get_family(flow.family).denoiser_subfolder}.")


def test_text_and_latent_caches_train_to_the_losses_of_no_cache(capsys, tmp_path, flow):
    """The latent cache stores the 16-channel distribution; scale_latents applies the VAE's shift
    and scale to cached and fresh latents alike, so every step's loss and the LoRA are the same."""
    fresh = _train(capsys, flow, tmp_path / "fresh", "trainer.max_steps=3", "data.cache_latents=false",
                   "train.cache_text_embeddings=false")
    cached = _train(capsys, flow, tmp_path / "cached", "trainer.max_steps=3", "data.cache_latents=true",
                    f"data.latent_cache_dir={tmp_path / 'latents'}", "train.cache_text_embeddings=true",
                    f"train.text_cache_dir={tmp_path / 'text'}")
    assert fresh.shapes[0] == (4, 3, 64, 64) and cached.shapes[0] == (4, 32, 8, 8)  # mean + log-variance, 16 channels
    torch.testing.assert_close(cached.losses, fresh.losses, rtol=1e-5, atol=0)
    a, b = _lora(flow, tmp_path / "fresh"), _lora(flow, tmp_path / "cached")
    assert len(a) == 2 * flow.lora_modules and a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert max(v.abs().max().item() for k, v in a.items() if ".lora_B." in k) > 0  # trained off B = 0

    parts = get_family(flow.family).load(str(tiny_model(flow.family)))
    vae = parts.vae.config
    assert (vae.latent_channels, vae.shift_factor, vae.scaling_factor) == (16, *flow.vae)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mode = parts.vae.encode(pixels).latent_dist.mode()
    got = batch_latents(parts.vae, {"pixel_values": pixels}, device=torch.device("cpu"), dtype=torch.float32,
                        deterministic=True)
    torch.testing.assert_close(got, (mode - flow.vae[0]) * flow.vae[1])


def test_buckets_of_two_aspect_ratios_reach_the_transformer(capsys, tmp_path, flow):
    """Wide (2:1) and square images in 16 px buckets: 48x96 and 64x64 batches both train, as 3x6
    and 4x4 patch grids of the 16-channel latents."""
    root = tmp_path / "data"
    shutil.copytree(QUICKSTART, root)
    for path in sorted((root / "images").glob("*.png"))[::2]:
        Image.open(path).resize((128, 64)).save(path)
    buckets = ("trainer.max_steps=6", "data.batch_size=2", f"data.root={root}", "data.bucketing=true", "data.bucket_step=16")
    rec = _train(capsys, flow, tmp_path / "run", *buckets)
    assert {s[-2:] for s in rec.shapes} == {(64, 64), (48, 96)}
    assert len(rec.losses) == 6 and all(math.isfinite(x) for x in rec.losses)
    assert max(v.abs().max().item() for k, v in _lora(flow, tmp_path / "run").items() if ".lora_B." in k) > 0
    # as the production preset trains them: the latents of each bucket cached
    cached = _train(capsys, flow, tmp_path / "cached", *buckets, "data.cache_latents=true",
                    f"data.latent_cache_dir={tmp_path / 'latents'}")
    assert {s[1:] for s in cached.shapes} == {(32, 8, 8), (32, 6, 12)}
    torch.testing.assert_close(cached.losses, rec.losses, rtol=1e-5, atol=0)


def _masked_data(tmp_path, name: str, box) -> str:
    root = tmp_path / name
    shutil.copytree(QUICKSTART, root)
    for path in (root / "images").glob("*.png"):
        out = root / "masks" / "images" / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, box)
        mask.save(out)
    return str(root)


def test_a_mask_of_ones_is_no_mask_and_a_half_mask_halves_the_loss(capsys, tmp_path, flow):
    """The loss is taken on the 8x8 latent grid the transformer's prediction is unpacked to: an
    all-white mask gives the unmasked losses; the left half white gives about half of each."""
    steps = ("trainer.max_steps=3",)
    plain = _train(capsys, flow, tmp_path / "plain", *steps, f"data.root={QUICKSTART}")
    ones = _train(capsys, flow, tmp_path / "ones", *steps, "train.masked_loss=true",
                  f"data.root={_masked_data(tmp_path, 'ones', (0, 0, 64, 64))}")
    half = _train(capsys, flow, tmp_path / "half", *steps, "train.masked_loss=true",
                  f"data.root={_masked_data(tmp_path, 'half', (0, 0, 32, 64))}")
    torch.testing.assert_close(ones.losses, plain.losses, rtol=1e-6, atol=0)
    ratios = [h / p for h, p in zip(half.losses, plain.losses)]
    assert all(0.3 < r < 0.7 for r in ratios), ratios  # normalised by all pixels: half the pixels, about half the loss
    assert ratios[0] != pytest.approx(1.0, abs=0.05)


def test_prior_preservation_renders_class_images_with_the_pipeline_and_logs_the_class_loss(capsys, tmp_path, flow):
    run = tmp_path / "run"
    _train(capsys, flow, run, "trainer.max_steps=2", "data.batch_size=2", "trainer.log_every_n_steps=1",
           "data.class_prompt=a photo of a shape", "data.num_class_images=2", "data.class_sample_steps=2",
           f"paths.cache_dir={tmp_path / 'cache'}")
    [folder] = (tmp_path / "cache" / "class_images").iterdir()
    images = sorted((folder / "images").glob("*.png"))
    assert len(images) == 2 and {Image.open(p).size for p in images} == {(64, 64)}
    rows = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    prior = [float(r.split(",")[header.index("train/prior_loss_step")]) for r in rows[1:]
             if r.split(",")[header.index("train/prior_loss_step")]]
    assert len(prior) == 2 and all(math.isfinite(x) and x > 0 for x in prior)


def test_the_ema_is_the_by_hand_ema_and_is_what_the_run_exports(capsys, tmp_path, flow):
    decay, run = 0.25, tmp_path / "run"
    _train(capsys, flow, run, "trainer.max_steps=4", "data.batch_size=2", "train.ema.enabled=true", f"train.ema.decay={decay}",
           "train.ema.use_for_export=true", "callbacks.model_checkpoint.every_n_train_steps=1")
    weights = [_lora(flow, run, f"step{n:06d}") for n in range(1, 5)]
    saved = load_checkpoint(run / "checkpoints" / "step000004.ckpt")["sdtune"]["ema"]
    assert saved["optimization_step"] == 4
    ema = dict(zip(saved["names"], saved["shadow_params"]))
    hand = dict(weights[0])
    for n in range(2, 5):
        d = min(decay, n / (9 + n))
        hand = {k: d * hand[k] + (1 - d) * weights[n - 1][k] for k in hand}
    assert ema.keys() == hand.keys() and len(ema) == 2 * flow.lora_modules
    for k in hand:
        torch.testing.assert_close(ema[k], hand[k], rtol=1e-5, atol=1e-7)
    assert max((ema[k] - weights[-1][k]).abs().max().item() for k in ema) > 1e-4  # it lags the raw weights
    family = get_family(flow.family)
    lora = read_lora(run / "lora.safetensors")  # in the family's default layout (SD3.5: diffusers, FLUX: kohya)
    assert lora.format == family.default_export_format and lora.metadata.get("sdtune.ema") == "true"
    denoiser = family.load(str(tiny_model(flow.family))).denoiser
    exported = lora.peft_tensors([n for n, _ in denoiser.named_modules()], denoiser.config, family=flow.family)
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)


class NaNAt(L.Callback):
    """Makes the loss of optimizer step ``step`` NaN (its noise, as the training step receives it)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["noise"] = batch["noise"] * float("nan")


def test_the_nan_guard_stops_naming_the_step_or_skips_it(capsys, tmp_path, flow):
    nan = ("trainer.max_steps=5", "trainer.nonfinite_check_every=4", "callbacks.model_checkpoint.every_n_train_steps=100",
           "+callbacks.nan_at._target_=tests.training.test_flow_features.NaNAt", "+callbacks.nan_at.step=2")
    code, err = run_main(capsys, *RUN, *flow.args(), *nan, f"hydra.run.dir={tmp_path / 'stop'}")
    assert code == 2 and "Traceback" not in err
    assert "training stopped: the loss is nan at step 2" in err and "noticed at the check after 4 steps" in err, err[-2000:]
    assert not (tmp_path / "stop" / "lora.safetensors").exists()
    rec = _train(capsys, flow, tmp_path / "skip", *nan, "trainer.skip_nonfinite=true")
    assert [math.isnan(x) for x in rec.losses] == [False, False, True, False, False]
    last = load_checkpoint(tmp_path / "skip" / "checkpoints" / "last.ckpt")
    assert last["sdtune"]["skipped_nonfinite"] == 1
    assert all(torch.isfinite(t).all() for t in read_lora(tmp_path / "skip" / "lora.safetensors").raw.values())
