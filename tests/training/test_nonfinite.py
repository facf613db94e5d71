"""The NaN/Inf guard without a per-step host read (sdtune.training.nonfinite): a non-finite loss at step k
is recorded on the device, the run fails at the next read (every trainer.nonfinite_check_every
steps, before any checkpoint, samples or the LoRA are written) naming step k, and no file holds
weights updated at step k or later."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sdtune.training.checkpointing import load_checkpoint
from sdtune.training.nonfinite import NONE, NonFiniteGuard
from sdtune.utils.errors import NonFiniteLossError
from tests.helpers.cli import run_main
from tests.helpers.paths import CACHE


class _Trainer:
    """What NonFiniteGuard.check reads of a Trainer (one process)."""

    def __init__(self, step: int):
        self.global_step = step
        self.world_size = 1
        self.strategy = None


def test_the_guard_keeps_the_first_bad_step_and_its_loss_on_the_device():
    guard = NonFiniteGuard(every=5)
    for step, value in enumerate([0.5, 0.4, float("inf"), float("nan"), 0.3]):
        guard.note(torch.tensor(value), step)
    assert guard.first_step.item() == 2 and guard.first_loss.item() == float("inf")  # the first, not the last
    assert [guard.due(s) for s in (0, 4, 5, 10)] == [False, False, True, True]
    with pytest.raises(NonFiniteLossError) as err:
        guard.check(_Trainer(5), lr=1e-4)
    message = str(err.value)
    assert "the loss is inf at step 2 (noticed at the check after 5 steps; no weights updated at step 2 or later" in message
    assert "optim.optimizer.lr=0.0001" in message and "skip_nonfinite=true" in message
    assert not guard.due(5)  # checked at step 5 already (gradient accumulation repeats step 5)
    clean = NonFiniteGuard(every=1)
    for step in range(3):
        clean.note(torch.tensor(1.0), step)
    assert clean.first_step.item() == NONE
    clean.check(_Trainer(3), lr=None)  # all finite: no error
    NonFiniteGuard(every=1).check(_Trainer(0), lr=None)  # nothing noted yet (skip_nonfinite=true): no read


class NaNAt(L.Callback):
    """Makes the loss of optimizer step ``step`` NaN: its noise, as the training step receives it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["noise"] = batch["noise"] * float("nan")


def _run_with_nan(capsys, tmp_path: Path, data: Path, *extra: str) -> tuple[int, str, Path]:
    run = tmp_path / "run"
    code, err = run_main(
        capsys, "model=tiny", f"model.path={CACHE / 'tiny-sd15'}", f"data.root={data}", "trainer=cpu",
        "trainer.max_steps=8", "data.resolution=64", "data.cache_latents=true", "callbacks.samples=null",
        f"paths.cache_dir={tmp_path / 'cache'}", "+callbacks.nan_at._target_=tests.training.test_nonfinite.NaNAt",
        "+callbacks.nan_at.step=3", f"hydra.run.dir={run}", *extra)
    return code, err, run


@pytest.mark.slow
@pytest.mark.parametrize("when, extra, noticed", [
    ("checkpoint", ["trainer.nonfinite_check_every=7", "callbacks.model_checkpoint.every_n_train_steps=2"],
     "noticed before writing the checkpoint of step 4"),
    ("periodic", ["trainer.nonfinite_check_every=5", "callbacks.model_checkpoint.every_n_train_steps=100"],
     "noticed at the check after 5 steps"),
    ("end", ["trainer.nonfinite_check_every=100", "callbacks.model_checkpoint=null"], "noticed before writing the LoRA"),
])
def test_a_nan_at_step_3_stops_the_run_naming_step_3_before_anything_later_is_saved(capsys, tmp_path, tiny_sd15, dataset,
                                                                                   when, extra, noticed):
    code, err, run = _run_with_nan(capsys, tmp_path, dataset, *extra)
    assert code == 2 and "Traceback" not in err
    assert "training stopped: the loss is nan at step 3" in err and noticed in err, err[-2000:]
    assert not (run / "lora.safetensors").exists() and not (run / "samples.png").exists()
    saved = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
    if when == "checkpoint":  # the step-2 checkpoint (weights before step 3) stays and loads; step 4's was refused
        assert saved == ["last.ckpt", "step000002.ckpt"]
        last = load_checkpoint(run / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 2 and all(torch.isfinite(t).all() for t in last["state_dict"].values())
    else:
        assert saved == []
