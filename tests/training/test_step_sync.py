"""Acceptance 1 of issue 16: the training step issues no host-device synchronisation in steady state.

On the CPU, an instrumented real run (``python -m sdtune`` in this process, tiny SD1.5) counts every
call of ``Tensor.tolist/item/__bool__/__int__/__float__/cpu`` from the start of step 2 to the start
of the second-to-last step: the steps' batch transfer, training step, backward, optimizer step and
every callback's batch hooks. Logging, checkpoints and the NaN/Inf check are set to intervals longer
than the run, and the progress bar (one read a second, by design) is off. Two kinds of call are
host-side by design and not counted, but listed apart: those inside ``on_before_batch_transfer``
(the per-sample seeds are read there, on the CPU, before the batch goes to the device) and those of
``torch.optim`` (non-capturable optimizers keep their step counter on the CPU, also on a GPU).

On a CUDA machine the same run goes under ``torch.cuda.set_sync_debug_mode("error")`` (marked ``gpu``).
"""

from __future__ import annotations

import shutil
import traceback
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from tests.helpers.cli import run_main
from tests.helpers.models import tiny_model
from tests.helpers.paths import CACHE, QUICKSTART

METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu")
HOST_SIDE = ("on_before_batch_transfer",)  # function names whose calls are host-side by design
STEPS = 6  # counted: from the start of step 2 to the start of step STEPS - 1 (steps 2, 3, 4)
PROBES: list[StepSyncProbe] = []


def _caller(stack: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The first frame outside torch's own tensor code: who asked."""
    for frame in reversed(stack):
        if "/torch/_tensor.py" not in frame.filename and "/torch/overrides.py" not in frame.filename:
            return frame
    return None


class StepSyncProbe(L.Callback):
    """Counts the synchronising tensor calls between the start of step 2 and of step STEPS - 1;
    with CUDA, also runs that window under ``torch.cuda.set_sync_debug_mode("error")``."""

    def __init__(self):
        self.counted: Counter[str] = Counter()  # "method at file:line" -> calls
        self.host_side: Counter[str] = Counter()
        self.optimizer: Counter[str] = Counter()
        self.active = False
        self.steps: list[int] = []
        self._saved = {}
        PROBES.append(self)

    def _patch(self) -> None:
        for name in METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counting(tensor, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    stack = traceback.extract_stack()[:-1]
                    caller = _caller(stack)
                    where = f"{_name} at {Path(caller.filename).name}:{caller.lineno} {caller.name}" if caller else _name
                    if any(f.name in HOST_SIDE for f in stack):
                        self.host_side[where] += 1
                    elif caller is not None and "/torch/optim/" in caller.filename:  # the step runs inside optimizer.step
                        self.optimizer[where] += 1
                    else:
                        self.counted[where] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counting)

    def _unpatch(self) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _set_active(self, on: bool, trainer) -> None:
        self.active = on
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error" if on else "default")

    def on_train_start(self, trainer, pl_module) -> None:
        self._patch()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            self._set_active(True, trainer)
        if trainer.global_step == STEPS - 1:
            self._set_active(False, trainer)
        if self.active:
            self.steps.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._set_active(False, trainer)
        self._unpatch()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)


def _data(root: Path, *, masks: bool = False) -> Path:
    """Six quickstart images (one epoch is longer than the run: no epoch-end metrics in the window)."""
    (root / "images").mkdir(parents=True)
    rows = ["file_name,text"]
    for i, src in enumerate(sorted((QUICKSTART / "images").glob("*.png"))[:6]):
        shutil.copy(src, root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,caption {i}")
        if masks and i % 2 == 0:
            (root / "masks" / "images").mkdir(parents=True, exist_ok=True)
            Image.new("L", Image.open(src).size, 255 if i else 128).save(root / "masks" / "images" / f"{i}.png")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def _run(capsys, tmp_path: Path, *extra: str, accelerator: str = "cpu", masks: bool = False) -> StepSyncProbe:
    PROBES.clear()
    data = _data(tmp_path / "data", masks=masks)
    model = [a for a in extra if a.startswith("model")] or ["model=tiny", f"model.path={CACHE / 'tiny-sd15'}"]
    extra = tuple(a for a in extra if not a.startswith("model"))
    args = [*model, f"data.root={data}", "trainer=cpu",
            f"trainer.accelerator={accelerator}", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1000",
            "trainer.nonfinite_check_every=1000", "+trainer.enable_progress_bar=false", "data.resolution=64",
            "callbacks.model_checkpoint.every_n_train_steps=1000", "callbacks.samples=null", "callbacks.loss_plot=null",
            f"paths.cache_dir={tmp_path / 'cache'}", "+callbacks.sync_probe._target_=tests.training.test_step_sync.StepSyncProbe",
            f"hydra.run.dir={tmp_path / 'run'}", *extra]
    code, err = run_main(capsys, *args)
    assert code == 0, err[-3000:]
    [probe] = PROBES
    assert probe.steps == list(range(2, STEPS - 1))
    return probe


CASES = {
    "caches on": ["data.cache_latents=true"],
    "caches off": ["data.cache_latents=false", "train.cache_text_embeddings=false", "data.random_flip=true"],
    "prior preservation": ["data.class_prompt=a photo", "data.num_class_images=2", "data.class_sample_steps=2"],
    "masked loss": ["train.masked_loss=true", "data.cache_latents=true"],
    "sdxl": ["model=tiny_sdxl", f"model.path={CACHE / 'tiny-sdxl'}"],  # micro-conditioning from the batch
}


@pytest.mark.parametrize("case", [
    "caches on",
    pytest.param("caches off", marks=pytest.mark.slow),
    pytest.param("prior preservation", marks=pytest.mark.slow),
    pytest.param("masked loss", marks=pytest.mark.slow),
    pytest.param("sdxl", marks=pytest.mark.slow),
])
def test_the_steady_state_step_never_reads_a_tensor_back(capsys, tmp_path, tiny_sd15, case):
    if case == "sdxl":
        tiny_model("sdxl")
    """Catches any per-step .item()/.tolist()/bool()/int()/float()/.cpu() on a tensor in the step,
    the NaN guard, the batch transfer or a callback's batch hooks (each a GPU sync), naming where."""
    probe = _run(capsys, tmp_path, *CASES[case], masks=case == "masked loss")
    assert dict(probe.counted) == {}, probe.counted
    # the seeds (and the class-sample count) are read where they are meant to be: on the CPU, before
    # the batch moves, once per step
    expected = {"tolist"} | ({"__int__"} if case == "prior preservation" else set())
    assert {k.split(" at ")[0] for k in probe.host_side} == expected, probe.host_side
    assert all(k.endswith(" with_randomness") and n == 3 for k, n in probe.host_side.items()), probe.host_side


@pytest.mark.slow
def test_the_probe_counts_the_per_step_sync_of_skip_nonfinite(capsys, tmp_path, tiny_sd15):
    """The instrument works: trainer.skip_nonfinite=true keeps its one host read per step (the
    decision to skip must be taken before the optimizer step), and the probe sees exactly that."""
    probe = _run(capsys, tmp_path, "trainer.skip_nonfinite=true", "data.cache_latents=true")
    assert sum(probe.counted.values()) == 3, probe.counted
    [(where, calls)] = probe.counted.items()
    assert where.startswith("__bool__ at nonfinite.py") and calls == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_the_cuda_step_raises_no_sync_in_sync_debug_mode(capsys, tmp_path, tiny_sd15, case):
    """On a GPU: steps 2-4 under torch.cuda.set_sync_debug_mode("error"), which raises at any
    synchronising CUDA call (a blocking copy, .item(), nonzero, ...); bf16-mixed (16-mixed's
    GradScaler reads its inf check back on every step by design)."""
    probe = _run(capsys, tmp_path, *CASES[case], "trainer.precision=bf16-mixed", accelerator="gpu",
                 masks=case == "masked loss")
    assert dict(probe.counted) == {}
