"""EMA of the LoRA weights (``train.ema``): the maths against a by-hand EMA, which weights each
export path writes, exact resume after SIGKILL, and that an EMA export still teaches the concept."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.export import export_checkpoint
from sdtune.lora.files import read_lora
from sdtune.lora.layers import live_lora_state, lora_tensors
from sdtune.training.checkpointing import load_checkpoint
from sdtune.training.ema import exported_weights, start_ema
from sdtune.training.module import LoRATrainingModule
from tests.helpers.cli import kill_when_written, run_cli
from tests.helpers.config import compose_cfg, resolved

# Short runs on the tiny random SD1.5 (plumbing, not learning), every checkpoint kept.
TINY_RUN = ["experiment=quickstart", "model=tiny", "callbacks.samples=null", "callbacks.concept_probe=null",
            "data.val_images=0", "data.batch_size=1", "callbacks.lora_export.format=diffusers",
            "callbacks.model_checkpoint.every_n_train_steps=1", "train.ema.enabled=true"]
DECAY = 0.25  # low, so that both the (1+n)/(10+n) ramp (steps 2-3) and the cap (steps 4-5) act


def _ema_of(ckpt: dict) -> dict[str, torch.Tensor]:
    saved = ckpt["sdtune"]["ema"]
    return dict(zip(saved["names"], saved["shadow_params"]))


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory, tiny_sd15) -> dict[str, Path]:
    """Two tiny runs: EMA exported (5 optimizer steps of 2 accumulated micro-batches), and EMA kept but not exported."""
    runs = {}
    for name, extra in (("export", ["train.ema.use_for_export=true", "trainer.max_steps=5",
                                    "trainer.accumulate_grad_batches=2"]),
                        ("raw", ["trainer.max_steps=3"])):
        run = tmp_path_factory.mktemp(f"ema-{name}") / "run"
        proc = run_cli(*TINY_RUN, f"train.ema.decay={DECAY}", *extra, f"hydra.run.dir={run}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = run
    return runs


@pytest.mark.slow
def test_ema_equals_a_by_hand_ema_of_the_weights_after_each_optimizer_step(ema_runs):
    """The checkpointed EMA equals s_1 = w_1, s_n = d_n s + (1 - d_n) w_n with d_n = min(decay, n/(9+n)) over the
    raw LoRA weights w_n of each optimizer step (one checkpoint per step). Catches: an update per micro-batch
    (accumulate_grad_batches=2 would double the step count and change the values), a wrong or ignored
    decay, an EMA never updated (it would equal the initial weights)."""
    ckpts = [load_checkpoint(ema_runs["export"] / "checkpoints" / f"step{n:06d}.ckpt") for n in range(1, 6)]
    weights = [lora_tensors(c["state_dict"]) for c in ckpts]
    saved = ckpts[-1]["sdtune"]["ema"]
    assert saved["optimization_step"] == ckpts[-1]["global_step"] == 5
    ema = _ema_of(ckpts[-1])
    assert ema.keys() == weights[0].keys() and ema
    hand = {k: v.clone() for k, v in weights[0].items()}
    for n in range(2, 6):
        d = min(DECAY, n / (9 + n))
        hand = {k: d * hand[k] + (1 - d) * weights[n - 1][k] for k in hand}
    for k in hand:
        torch.testing.assert_close(ema[k], hand[k], rtol=1e-5, atol=1e-7)
    # and it is not simply the last weights: the average lags behind them
    assert max((ema[k] - weights[-1][k]).abs().max().item() for k in ema) > 1e-4


@pytest.mark.slow
def test_export_writes_the_ema_weights_only_when_asked(ema_runs):
    """use_for_export=true: the run's lora.safetensors and `sdtune.export <ckpt>` hold the EMA tensors and say
    so in the header; use_for_export=false: both hold the raw weights and no sdtune.ema. Catches exporting the
    raw weights when asked for the EMA ones (or the reverse), and a header that does not tell them apart."""
    for name, expect_ema in (("export", True), ("raw", False)):
        run = ema_runs[name]
        last = load_checkpoint(run / "checkpoints" / "last.ckpt")
        ema, raw = _ema_of(last), lora_tensors(last["state_dict"])
        assert max((ema[k] - raw[k]).abs().max().item() for k in ema) > 1e-4  # the two differ, so the choice shows
        want = ema if expect_ema else raw
        out = run.parent / "exported.safetensors"
        export_checkpoint(run / "checkpoints" / "last.ckpt", out, format="diffusers")
        for path in (run / "lora.safetensors", out):
            lora = read_lora(path)
            assert lora.tensors.keys() == want.keys()
            assert all(torch.equal(lora.tensors[k], want[k]) for k in want), (name, path.name)
            assert lora.metadata.get("sdtune.ema") == ("true" if expect_ema else None)
            assert lora.metadata.get("sdtune.ema_decay") == (repr(DECAY) if expect_ema else None)


def test_samples_draw_the_exported_weights_and_training_resumes_on_the_raw_ones(tmp_path, tiny_sd15):
    """exported_weights() (what the sample grid and the concept probe render under) puts the EMA weights into
    the live LoRA layers only with use_for_export, and restores the raw ones bit for bit after. Catches
    samples that show weights other than the exported file's, and an EMA swap that leaks into training."""
    for use in (True, False):
        cfg = resolved(compose_cfg("experiment=quickstart", "model=tiny", "train.ema.enabled=true",
                                   f"train.ema.use_for_export={str(use).lower()}", output_dir=tmp_path))
        module = LoRATrainingModule(cfg)
        module.setup("fit")
        module.ema = start_ema(module.parts.unet, cfg, None)
        with torch.no_grad():  # two "optimizer steps": the EMA lands between the two weight sets
            for value in (0.01, 0.03):
                for p in module.ema.params:
                    p.fill_(value)
                module.ema.update()
        raw = live_lora_state(module.parts.unet)
        ema = module.ema.tensors()
        assert ema.keys() == raw.keys() and not any(torch.equal(ema[k], raw[k]) for k in raw)
        with exported_weights(module):
            inside = live_lora_state(module.parts.unet)
        after = live_lora_state(module.parts.unet)
        assert all(torch.equal(inside[k], (ema if use else raw)[k]) for k in raw)
        assert all(torch.equal(after[k], raw[k]) for k in raw)  # training continues on its own weights
        exported = module.lora_state()
        assert all(torch.equal(exported[k], (ema if use else raw)[k]) for k in raw)


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_ema_and_lora_file(tmp_path, tiny_sd15):
    """Kill a run with the EMA on mid-epoch, resume it with ckpt_path=last: the EMA state and the (EMA) LoRA file
    equal an uninterrupted run's bit for bit. Catches an EMA missing from checkpoints (the resume would restart
    it from the current weights), one restored before the weights, or a lost step count (another decay)."""
    args = [*TINY_RUN, "train.ema.use_for_export=true", "train.ema.decay=0.9", "trainer.max_steps=8",
            "data.batch_size=4", "callbacks.model_checkpoint.every_n_train_steps=4", "data.random_flip=true",
            "data.caption_dropout=0.2", "train.noise_offset=0.05"]
    whole = tmp_path / "whole"
    proc = run_cli(*args, f"hydra.run.dir={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "killed"
    code = kill_when_written([*args, f"hydra.run.dir={run}"], run / "checkpoints" / "step000004.ckpt")
    assert code == -signal.SIGKILL and not (run / "lora.safetensors").exists()
    killed_at = load_checkpoint(max((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime))["global_step"]
    assert killed_at < 8 and killed_at % 3 != 0  # mid-epoch: 12 images in batches of 4
    resumed = run_cli(*args, f"hydra.run.dir={run}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(run / "checkpoints" / "last.ckpt"), load_checkpoint(whole / "checkpoints" / "last.ckpt")
    assert a["sdtune"]["ema"]["optimization_step"] == b["sdtune"]["ema"]["optimization_step"] == 8
    ema_a, ema_b = _ema_of(a), _ema_of(b)
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    fa, fb = load_file(str(run / "lora.safetensors")), load_file(str(whole / "lora.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.slow
def test_an_ema_export_still_teaches_the_concept(tmp_path):
    """The quickstart on the toy base with the EMA exported (default decay 0.999), in half its steps (CI time):
    the probe, which renders what is exported, reads the 'sks' background as pink with the LoRA and not
    without it. Catches an EMA that lags so far (or never updates) that the exported LoRA has not learned."""
    run = tmp_path / "run"
    proc = run_cli("experiment=quickstart", "trainer.max_steps=150", "callbacks.samples=null", "data.val_images=0",
                   "train.ema.enabled=true", "train.ema.use_for_export=true", f"hydra.run.dir={run}", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "summary.json").read_text())["concept_probe"]["sks"]
    assert report["lora_on"]["pink"] >= 0.8, report
    assert report["lora_off"]["pink"] <= 0.1, report
    assert read_lora(run / "lora.safetensors").metadata.get("sdtune.ema") == "true"
