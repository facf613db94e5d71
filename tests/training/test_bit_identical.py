"""Golden runs: a fixed-seed quickstart LoRA must come out bit-identical to the recorded one.

Refactors of the training path (the family interface, the objective, the draw order of noise and
timesteps) must not change what a UNet family trains. Each case reruns one short quickstart and
compares the sha256 of every tensor of ``lora.safetensors``, and the header's values that hold no
path, with ``tests/golden/<case>.json``. Bits depend on the library versions, the CPU's kernel set
and the thread count, so the case skips, naming the difference, where the versions or the kernels
differ from the recorded ones (CI installs the lock), and runs with a fixed thread count.

Regenerate after an intended change (and say why in the commit):
``SDTUNE_CACHE=... python -m tests.training.test_bit_identical``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import run_cli
from tests.helpers.paths import ROOT

GOLDEN = ROOT / "tests" / "golden"
THREADS = "2"
# Every source of randomness of a step is on (caption dropout, flips, offset noise besides the
# latent sample, the noise and the timestep), and alpha != rank, so a change of draw order or of
# the alpha written to the header shows.
COMMON = ("experiment=quickstart", "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0",
          "lora.alpha=8", "data.random_flip=true", "data.caption_dropout=0.2", "train.noise_offset=0.05")
CASES = {
    "quickstart_toy": (*COMMON, "model=toy", "trainer.max_steps=30"),
    # SDXL's micro-conditioning (text_time: pooled text and the size/crop ids) on the tiny model.
    "quickstart_tiny_sdxl": (*COMMON, "model=tiny_sdxl", "trainer.max_steps=5"),
}
# Header values that hold paths of the machine that ran (the config, the base's folder).
PATH_KEYS = ("sdtune.config", "sdtune.base_model")


def environment() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": THREADS}


def digest(lora: Path) -> dict:
    """sha256 of every tensor's bytes (with dtype and shape) and the header's path-free values."""
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        tensors = {}
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            raw = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            tensors[key] = f"{t.dtype}{list(t.shape)}:{hashlib.sha256(raw).hexdigest()}"
        header = {k: v for k, v in sorted((f.metadata() or {}).items()) if k not in PATH_KEYS}
    return {"tensors": tensors, "header": header}


def train(case: str, run_dir: Path) -> dict:
    proc = run_cli(*CASES[case], f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return digest(run_dir / "lora.safetensors")


def _check(case: str, tmp_path: Path) -> None:
    recorded = json.loads((GOLDEN / f"{case}.json").read_text())
    now = environment()
    differ = {k: (v, now.get(k)) for k, v in recorded["environment"].items() if now.get(k) != v}
    if differ:
        pytest.skip(f"golden {case} was recorded with other versions or CPU kernels (recorded, here): {differ}; "
                    "bits are only comparable under the same ones (CI installs requirements.lock)")
    got = train(case, tmp_path / "run")
    assert got["header"] == recorded["header"], "the LoRA header changed"
    changed = sorted(k for k in recorded["tensors"] if got["tensors"].get(k) != recorded["tensors"][k])
    extra = sorted(set(got["tensors"]) - set(recorded["tensors"]))
    assert not changed and not extra, (
        f"{len(changed)} of {len(recorded['tensors'])} tensors differ from tests/golden/{case}.json "
        f"(first: {changed[:3]}), {len(extra)} new (first: {extra[:3]}): the training path is no longer bit-identical"
    )


@pytest.mark.slow
def test_quickstart_toy_is_bit_identical(tmp_path):
    _check("quickstart_toy", tmp_path)


@pytest.mark.slow
def test_quickstart_tiny_sdxl_is_bit_identical(tmp_path):
    _check("quickstart_tiny_sdxl", tmp_path)


def record(cases: list[str]) -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:
            got = train(case, Path(tmp) / "run")
        out = {"args": list(CASES[case]), "environment": environment(), **got}
        (GOLDEN / f"{case}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN / case}.json: {len(got['tensors'])} tensors")


if __name__ == "__main__":
    record(sys.argv[1:] or list(CASES))
