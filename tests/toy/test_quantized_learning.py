"""Learning on a quantized base (issue 28, acceptance 3): the quickstart with ``model.quantize=int8``
teaches its trigger (the probe reads >= 80% pink with the LoRA on, <= 10% off), and the run's own
file loads into diffusers' StableDiffusionPipeline over the *unquantized* toy base and draws it.
The test of the test: the same run with peft's quantized LoRA layers cut out of the forward pass
(so no gradient reaches the LoRA) must fail the check. One good run serves both checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdtune.toy.concepts import TRIGGERS, concept_shares, probe_prompts
from tests.helpers.cli import run_cli, run_main
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow

#: The quickstart (toy SD1.5, trigger "sks" = pink, 300 steps) on an int8 base, without the sample grid.
QUICKSTART_INT8 = ("experiment=quickstart", "model.quantize=int8", "callbacks.samples=null", "data.val_images=0")


def quantized_run(capsys, run: Path, *overrides: str) -> dict:
    code, err = run_main(capsys, *QUICKSTART_INT8, *overrides, f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    return json.loads((run / "summary.json").read_text())["concept_probe"]["sks"]


def learned(report: dict) -> bool:
    return report["lora_on"][TRIGGERS["sks"]] >= 0.8 and report["lora_off"][TRIGGERS["sks"]] <= 0.1


def test_int8_base_learns_the_quickstart_concept_and_its_file_loads_unquantized(tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtune.inference.sampling import render

    run = tmp_path / "run"
    proc = run_cli(*QUICKSTART_INT8, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.quantize: the denoiser holds its Linear weights in int8" in proc.stdout + proc.stderr
    report = json.loads((run / "summary.json").read_text())["concept_probe"]["sks"]
    assert learned(report), json.dumps(report, indent=1)
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models" / "toy" / "sd15", torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = probe_prompts("sks")
    prompts, seeds = [p for p in prompts for _ in (0, 1)], [s for _ in prompts for s in (0, 1)]

    def pink_share() -> float:
        images = render(pipe, prompts, seeds, steps=20, size=64, call_kwargs={"guidance_scale": 2.0})
        return concept_shares(images, "sks", TRIGGERS).shares[TRIGGERS["sks"]]

    before = pink_share()
    pipe.load_lora_weights(str(run / "lora.safetensors"))  # the unquantized base, diffusers' own loader
    after = pink_share()
    assert before <= 0.1 and after >= 0.8, (before, after)


def test_the_int8_learning_check_fails_when_the_quantized_lora_layers_are_cut(capsys, tmp_path, monkeypatch):
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    calls, forward = [], TorchaoLoraLinear.forward

    def cut(self, x, *args, **kwargs):  # the same output, but the LoRA's share passes no gradient back
        calls.append(1)
        out = forward(self, x, *args, **kwargs)
        delta = out - self.base_layer(x, *args, **kwargs)
        return out - delta + delta.detach() + 0 * delta  # 0 * delta keeps the graph, so the step still runs

    monkeypatch.setattr(TorchaoLoraLinear, "forward", cut)
    report = quantized_run(capsys, tmp_path / "run", "trainer.max_steps=150")
    assert calls  # the quantized layers were the ones trained
    assert not learned(report), json.dumps(report, indent=1)
