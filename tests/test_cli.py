"""End to end through `python -m sdtune`: the run folder, diffusers loading, export, resume, sweeps."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.export import export_checkpoint
from sdtune.families import get_family
from sdtune.lora.apply import apply_lora
from sdtune.lora.files import read_lora
from sdtune.lora.layers import is_lora_key
from sdtune.training.checkpointing import load_checkpoint
from tests.helpers.cli import QUICKSTART_ARGS, run_cli
from tests.helpers.comfyui import load_like_comfyui, unet_key_map
from tests.helpers.paths import QUICKSTART

pytestmark = pytest.mark.slow


def _read_safetensors(path):
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def _val_loss_by_hand(run) -> float:
    """The run's validation loss with its final LoRA file, computed here from the diffusion maths:
    each validation image's VAE mean latent, noised with the run's fixed validation noise and
    timesteps, against the epsilon or v target from the scheduler's alphas; the mean over images."""
    from sdtune.data.datamodule import ImageCaptionDataModule
    from sdtune.data.records import load_records
    from sdtune.families.objectives import DDPMObjective
    from sdtune.training.diffusion import validation_randomness

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    family = get_family(cfg["model"]["family"])
    parts = family.load(cfg["model"]["path"])
    apply_lora(parts, read_lora(run / "lora.safetensors"), family=family, path=run / "lora.safetensors", adapter_name="run")
    scheduler = parts.noise_scheduler
    data = ImageCaptionDataModule.from_config(load_records(cfg["data"]["root"]), cfg["data"], seed=cfg["seed"])
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            latents = parts.vae.encode(batch["pixel_values"]).latent_dist.mean * parts.vae.config.scaling_factor
            noise, t = validation_randomness(cfg["seed"], i, tuple(latents.shape), DDPMObjective(scheduler))
            a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            target = noise if scheduler.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
            text = family.encode_prompts(parts, batch["text"])["encoder_hidden_states"]
            pred = parts.unet(noisy, t, encoder_hidden_states=text).sample
            losses.append(((pred - target) ** 2).mean().item())
    assert len(losses) == cfg["data"]["val_images"]
    return sum(losses) / len(losses)


def test_quickstart_run_folder(quickstart_run):
    for rel in (".hydra/config.yaml", "config.yaml", "lora.safetensors", "samples.png", "checkpoints/last.ckpt"):
        assert (quickstart_run / rel).is_file(), rel
    assert sorted(p.name for p in (quickstart_run / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step000020.ckpt", "step000030.ckpt"]
    rows = list(csv.DictReader(open(quickstart_run / "logs" / "csv" / "metrics.csv")))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) >= 5 and all(0 < v < 10 for v in losses)
    # the logged loss is the diffusion loss: the last validation loss is the MSE of the run's own
    # LoRA file's prediction against the scheduler's target, recomputed here by hand; and it falls
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert val[-1] == pytest.approx(_val_loss_by_hand(quickstart_run), rel=1e-4)
    assert val[-1] < 0.5 * val[0]  # the toy base learns the quickstart concept in 30 steps
    assert list((quickstart_run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # the grid: 2 rows (LoRA x0, x1) by 4 prompts, and the LoRA visibly changes the pictures
    grid = Image.open(quickstart_run / "samples.png").convert("RGB")
    tile, pad, label_w, label_h = 160, 4, 120, 34
    assert grid.size == (label_w + 4 * (tile + pad), label_h + 2 * (tile + pad))
    row0 = torch.tensor(list(grid.crop((label_w, label_h, grid.width, label_h + tile)).getdata()), dtype=torch.float)
    row1 = torch.tensor(list(grid.crop((label_w, label_h + tile + pad, grid.width, label_h + 2 * tile + pad)).getdata()), dtype=torch.float)
    assert (row0 - row1).abs().mean() > 1.0


def test_console_says_each_thing_once_under_one_bar_for_the_run(quickstart_run):
    out = (quickstart_run.parent / "stdout.txt").read_text()
    err = (quickstart_run.parent / "stderr.txt").read_text()
    assert out.count("Seed set to 42") == 1 and "Seed set to" not in err  # Lightning's own handler dropped
    assert "litlogger" not in out + err and "LeafSpec" not in err and "FLOPs" not in out + err
    bar = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("training:")]
    assert bar and "| 30/30 [" in bar[-1] and "loss=" in bar[-1], bar[-3:]  # steps of the run, smoothed loss
    assert "Epoch" not in err  # no per-epoch bar ("Epoch 17/-2 ... 7/11")
    assert "LoRA: 21,504 trainable parameters" in out


def test_lora_file_loads_in_diffusers_and_matches_our_unet(quickstart_run, tiny_sd15):
    """The run's one file (kohya layout, by default) loads in diffusers with every key consumed
    (diffusers' kohya converter raises on any key it leaves) and acts as our own UNet does."""
    lora_path = quickstart_run / "lora.safetensors"
    lora = read_lora(lora_path)
    assert lora.format == "kohya" and (lora.spec.rank, lora.spec.alpha) == (4, 8.0)  # alpha != rank: a wrong scale would show
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(lora_path))
        theirs = pipe.unet(x, t, ctx).sample

    parts = get_family("sd15").load(str(tiny_sd15))
    apply_lora(parts, lora, family="sd15", path=lora_path, adapter_name="default")  # refuses any unmatched key
    with torch.no_grad():
        ours = parts.unet.eval()(x, t, ctx).sample
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # ComfyUI (its key rules, tests/helpers/comfyui.py): every key consumed, each patch at alpha/rank = 2
    deltas, not_loaded = load_like_comfyui(lora.raw, unet_key_map(parts.unet))
    assert not not_loaded and len(deltas) == len(lora.raw) // 3
    module, delta = next(iter(sorted(deltas.items())))
    layer = parts.unet.get_submodule(module)
    expected = 2.0 * layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1)
    torch.testing.assert_close(delta, expected.detach())


def test_checkpoint_holds_lora_and_training_state_only(quickstart_run):
    ckpt_path = quickstart_run / "checkpoints" / "last.ckpt"
    lora_size = (quickstart_run / "lora.safetensors").stat().st_size
    assert ckpt_path.stat().st_size < 4 * lora_size
    ckpt = load_checkpoint(ckpt_path)  # weights_only=True
    assert ckpt["state_dict"] and all(is_lora_key(k) for k in ckpt["state_dict"])
    assert ckpt["global_step"] == 30 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["hyper_parameters"]["cfg"]["lora"]["alpha"] == 8
    data = ckpt["sdtune"].pop("data")  # the dataset manifest a resume compares against
    assert sorted(data) == sorted(f"images/{p.name}" for p in (QUICKSTART / "images").iterdir())
    assert ckpt["sdtune"] == {"family": "sd15", "rank": 4, "alpha": 8.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"], "num_train_images": 12,
                             "skipped_nonfinite": 0, "adapter": "lora", "ema": None, "text_encoder": None, "embedding": None}


def test_export_cli_reproduces_the_run_file(quickstart_run, tmp_path):
    out = tmp_path / "exported.safetensors"
    proc = run_cli(str(quickstart_run / "checkpoints" / "last.ckpt"), "--out", str(out), module="sdtune.export")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (kohya)" in proc.stdout
    ours, our_meta = _read_safetensors(out)
    run, run_meta = _read_safetensors(quickstart_run / "lora.safetensors")
    assert ours.keys() == run.keys()
    assert all(torch.equal(ours[k], run[k]) for k in run)
    our_meta.pop("ss_output_name"), run_meta.pop("ss_output_name")
    assert our_meta == run_meta


def test_export_never_loads_the_base_model(quickstart_run, tmp_path, monkeypatch):
    from sdtune.families.sd15 import SD15

    def refuse(*a, **k):
        raise AssertionError("export loaded the base model")

    monkeypatch.setattr(SD15, "load", refuse)
    out = export_checkpoint(quickstart_run / "checkpoints" / "step000020.ckpt", tmp_path / "s20.safetensors")
    assert read_lora(out).metadata["ss_steps"] == "20"


def test_export_cli_rejects_non_checkpoints(tmp_path):
    bogus = tmp_path / "x.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    proc = run_cli(str(bogus), "--out", str(tmp_path / "y.safetensors"), module="sdtune.export")
    assert proc.returncode == 2 and "is not a readable sdtune checkpoint" in proc.stderr
    assert not (tmp_path / "y.safetensors").exists()


def test_resume_continues_from_the_checkpoint_step(quickstart_run, tmp_path):
    """A named checkpoint resumes into a new run folder and finishes the baseline's run exactly."""
    run_dir = tmp_path / "resumed"
    proc = run_cli(*QUICKSTART_ARGS, f"ckpt_path={quickstart_run / 'checkpoints' / 'step000020.ckpt'}",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv")))
    steps = sorted({int(r["step"]) for r in rows})
    assert steps and min(steps) >= 20 and max(steps) <= 30  # continued, not restarted at 0
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 30
    ours, baseline = load_file(str(run_dir / "lora.safetensors")), load_file(str(quickstart_run / "lora.safetensors"))
    assert ours.keys() == baseline.keys() and all(torch.equal(ours[k], baseline[k]) for k in ours)


def test_cfg_job_prints_config_without_loading_anything(tmp_path):
    proc = run_cli("lora.rank=16", "--cfg", "job", env={"SDTUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "family: sd15" in proc.stdout and "rank: 16" in proc.stdout
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_kolors_rank16_config_resolves_and_fails_fast_without_a_local_model(tmp_path):
    proc = run_cli("model=kolors", "lora.rank=16", "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "family: kolors" in text and "rank: 16" in text
    assert text.count("resolution: 1024") == 2  # model.resolution and data.resolution
    # HF_HUB_OFFLINE makes this deterministic even on a machine with network
    hub = tmp_path / "hub"
    proc = run_cli("model=kolors", "lora.rank=16", "data.root=examples/quickstart", f"hydra.run.dir={tmp_path / 'run'}",
                   env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)})
    assert proc.returncode == 2
    assert "Could not load the kolors base model from model.path='Kwai-Kolors/Kolors-diffusers'" in proc.stderr
    assert "experiment=quickstart" in proc.stderr and "Traceback" not in proc.stderr
    # failed at the source check: no download was started and no training state exists
    assert not any(hub.rglob("*")) and not (tmp_path / "run" / "checkpoints").exists()


def test_run_file_carries_the_true_alpha_and_converts_to_diffusers_and_back(quickstart_run, tmp_path):
    from sdtune.lora.keys import DIFFUSERS_PREFIX, KOHYA_PREFIX

    run, run_meta = _read_safetensors(quickstart_run / "lora.safetensors")
    assert run and all(k.startswith(KOHYA_PREFIX) for k in run)
    assert {float(v) for k, v in run.items() if k.endswith(".alpha")} == {8.0}  # the true alpha, not rank 4
    assert run_meta["sdtune.format"] == "kohya" and run_meta["ss_network_alpha"] == "8.0"
    assert "lora_adapter_metadata" not in run_meta  # diffusers refuses a kohya file that carries it
    for source in (quickstart_run / "lora.safetensors", quickstart_run / "checkpoints" / "last.ckpt"):
        out = tmp_path / f"{source.stem}_diffusers.safetensors"
        proc = run_cli(str(source), "--format", "diffusers", "--out", str(out), module="sdtune.export")
        assert proc.returncode == 0, proc.stderr
        tensors, meta = _read_safetensors(out)
        assert tensors and all(k.startswith(DIFFUSERS_PREFIX) for k in tensors)
        assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0
    # and back: diffusers -> kohya (the default) gives the run's tensors again
    back = tmp_path / "back.safetensors"
    proc = run_cli(str(tmp_path / "lora_diffusers.safetensors"), "--out", str(back), module="sdtune.export")
    assert proc.returncode == 0, proc.stderr
    ours, _ = _read_safetensors(back)
    assert ours.keys() == run.keys() and all(torch.equal(ours[k], run[k]) for k in run)


def test_sweeps_work_for_every_family(tmp_path):
    sweep = tmp_path / "families"
    proc = run_cli("-m", "model=tiny,tiny_sdxl,tiny_kolors", "lora.rank=2", "experiment=quickstart", "trainer.max_steps=2",
                   "callbacks.samples=null", "data.val_images=0", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [read_lora(sweep / str(i) / "lora.safetensors").family for i in range(3)] == ["sd15", "sdxl", "kolors"]


def test_tracking_logger_preset_adds_wandb_and_mlflow():
    from tests.helpers.config import compose_cfg

    cfg = compose_cfg("experiment=quickstart", "logger=tracking")
    targets = sorted(node["_target_"].rsplit(".", 1)[1] for node in cfg.logger.values())
    assert targets == ["CSVLogger", "MLFlowLogger", "TensorBoardLogger", "WandbLogger"]


def test_outputs_go_under_the_folder_the_command_runs_in(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sdtune", "model=tiny", f"data.root={QUICKSTART}", "trainer=cpu",
                           "trainer.max_steps=1", "callbacks.samples=null", "data.batch_size=4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [lora] = list((tmp_path / "outputs" / "runs").glob("*/lora.safetensors"))
    assert read_lora(lora).metadata["ss_steps"] == "1"
