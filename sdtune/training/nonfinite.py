"""The NaN/Inf guard of the training loss, without a host read on every step.

Asking ``bool(torch.isfinite(loss))`` on every step blocks the CPU until the GPU has finished the
forward pass, so the next step cannot be queued behind it. With ``trainer.skip_nonfinite=false``
(the default) the run has to stop, not decide per step, so the decision can wait: each step folds
``isfinite(loss)`` into a device tensor holding the first non-finite optimizer step (and its loss),
and :meth:`NonFiniteGuard.check` reads it on the host only

- every ``trainer.nonfinite_check_every`` optimizer steps (by default ``trainer.log_every_n_steps``,
  when Lightning reads the logged metrics anyway),
- before every checkpoint is written (``LightningModule.on_save_checkpoint``), and
- when training ends, before the LoRA, embeddings and samples are written.

So no file ever holds weights from after a non-finite step: the run fails first, naming the step
the loss went bad at. Under DDP the ranks' records are combined at the check (an all-reduce
``min``, on every rank at the same step), so all ranks raise together.

``trainer.skip_nonfinite=true`` must decide before the optimizer step whether to skip it, so it
keeps one host read (and, under DDP, one all-reduce) per step: :func:`all_finite`.
"""

from __future__ import annotations

import torch

from sdtune.utils.errors import NonFiniteLossError

#: "No non-finite step yet" in the device record (any step number is smaller).
NONE = torch.iinfo(torch.int64).max


class NonFiniteGuard:
    """A device-side record of the first optimizer step whose loss was not finite."""

    def __init__(self, every: int):
        self.every = int(every)
        self.first_step: torch.Tensor | None = None  # () int64 on the device, NONE while all is finite
        self.first_loss: torch.Tensor | None = None  # () float32, the loss at that step
        self._checked_at = -1

    def reset(self, device: torch.device) -> None:
        """Start a clean record on ``device`` (filled on the device: no host-to-device copy)."""
        self.first_step = torch.full((), NONE, dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        """Fold this step's ``isfinite(loss)`` into the record; queued on the device, never read."""
        if self.first_step is None or self.first_step.device != loss.device:
            self.reset(loss.device)
        loss = loss.detach().float()
        first = ~torch.isfinite(loss) & (self.first_step == NONE)
        # clamp(max=step) takes the python int as a kernel argument: no tensor is copied to the device
        self.first_step = torch.where(first, self.first_step.clamp(max=int(step)), self.first_step)
        self.first_loss = torch.where(first, loss, self.first_loss)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (completed) is a periodic check (once per step, also
        with gradient accumulation, whose micro-batches end at the same ``step``)."""
        return step > 0 and step % self.every == 0 and step != self._checked_at

    def check(self, trainer, *, lr: float | None, before: str | None = None) -> None:
        """Read the record (the one host sync); raise :class:`NonFiniteLossError` if a step went bad.

        Every rank must call it at the same point: under DDP the records are combined first.
        """
        if self.first_step is None:
            return
        self._checked_at = trainer.global_step
        first = self.first_step
        if trainer.world_size > 1:
            first = trainer.strategy.reduce(first.clone(), reduce_op="min")
        step = int(first.item())
        if step == NONE:
            return
        mine = int(self.first_step.item()) == step  # this rank saw it: its loss value is the one to show
        loss = float(self.first_loss.item()) if mine else float("nan")
        raise NonFiniteLossError.at(loss, step, lr=lr, noticed=trainer.global_step, before=before)


def all_finite(trainer, loss: torch.Tensor) -> bool:
    """``trainer.skip_nonfinite=true``: whether every rank's ``loss`` is finite, decided together so
    that DDP ranks never disagree on skipping (which would hang them). One host read per step."""
    return trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
