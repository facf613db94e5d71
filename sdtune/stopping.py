"""Ctrl-C and SIGTERM stop a run at the next step boundary with everything saved.

Lightning turns SIGINT into a ``KeyboardInterrupt`` wherever it lands (possibly halfway through
an optimizer step) and saves nothing; SIGTERM ends the run at an epoch end. Here both only set a
flag. After the step that is running, the run writes a checkpoint of that step (the same moment a
periodic checkpoint is taken, so resuming from it gives the uninterrupted run's result bit for
bit) and the LoRA, skips the sample renders, and prints the command that continues it. A second
Ctrl-C stops at once, as usual.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

import lightning as L

from .resume import hydra_quote

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stopped_early(trainer: L.Trainer) -> bool:
    """Whether ``fit`` ended before ``max_steps`` because a stop was asked for."""
    return any(isinstance(c, GracefulStop) and c.signal_name for c in trainer.callbacks)


class GracefulStop(L.Callback):
    """See the module docstring. ``exit_code`` is the shell's for the signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.requested: int | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._active = False
        self._step_at_batch_start = -1

    @property
    def exit_code(self) -> int:
        return 128 + int(self.requested or 0)

    def _handle(self, signum, frame) -> None:
        if not self._active:  # left installed by an aborted fit: behave as the defaults do
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            sys.exit(128 + signum)
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint and the LoRA "
              "(Ctrl-C again stops at once, saving nothing)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        """Put the handlers found at ``setup`` back. Lightning re-installs the ones it found when fit
        started (ours) in its own teardown, so this runs again in ``on_fit_end``/``teardown``, after it."""
        self._active = False
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return
        if not self._previous:
            self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            if self._previous[s] is not signal.SIG_IGN:  # a signal the caller ignores stays ignored
                signal.signal(s, self._handle)
        self._active = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._install()  # before the base model loads: a Ctrl-C then stops after the first step

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning composes its own SIGTERM handler with ours at fit start, which would end the
        # run with an exception at the epoch end; ours alone decides. A SIGTERM it already noted
        # (during the sanity check) becomes ours.
        self._install()
        if trainer.received_sigterm:
            self.requested = signal.SIGTERM
            trainer._signal_connector.received_sigterm = False  # no public setter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # a micro-batch of gradient accumulation: stop only once the whole step is done
        asked = self.requested is not None
        if trainer.world_size > 1:  # every rank stops at the same step, or DDP would hang
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if not asked or trainer.should_stop:
            return
        self.signal_name = signal.Signals(self.requested or signal.SIGTERM).name
        for callback in trainer.checkpoint_callbacks:
            if hasattr(callback, "save_now"):
                callback.save_now(trainer)
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._active = False  # training is over: Ctrl-C interrupts the final renders as usual

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()
        if self.signal_name and trainer.is_global_zero:
            if not any(hasattr(c, "save_now") for c in trainer.checkpoint_callbacks):
                print(f"\nstopped by {self.signal_name} at step {trainer.global_step}; checkpoints are off "
                      "(callbacks.model_checkpoint=null), so this run cannot be continued.", file=sys.stderr, flush=True)
                return
            print(f"\nstopped by {self.signal_name} at step {trainer.global_step}; the checkpoint and the LoRA of "
                  f"that step are in {self.run_dir}. Continue with:\n  python -m sdtune "
                  f"{shlex.quote('ckpt_path=' + hydra_quote(str(self.run_dir)))}", file=sys.stderr, flush=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
