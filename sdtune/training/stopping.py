"""Ctrl-C and SIGTERM stop a run at the next step boundary with everything saved.

Lightning turns SIGINT into a ``KeyboardInterrupt`` wherever it lands (possibly halfway through
an optimizer step), saves nothing and exits 1; SIGTERM ends the run at an epoch end. Here both
only set a flag. After the step that is running, the run writes a checkpoint of that step (the
same moment a periodic checkpoint is taken, so resuming from it gives the uninterrupted run's
result bit for bit) and the LoRA, skips the sample renders, and prints the command that continues it.

Once training is over, a signal stops the final renders (the sample grid, the concept probe, the
last evaluation: each runs inside :func:`final_render`) at once; the checkpoint, the LoRA and
``summary.json`` (which says training finished) are still written, and the message says how to
draw the samples (resuming a finished run trains nothing and renders them). A second Ctrl-C
stops at once, saving nothing more. The exit status is the shell's for the signal: 130 for
SIGINT, 143 for SIGTERM.

Every callback that writes an end-of-run file asks :func:`writes_outputs` first (rank 0 only, never
in a ``fast_dev_run``), and renders inside :func:`final_render`; both live here, below evaluation/
and run/, so that those callbacks need nothing from the modules that wire a run.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

import lightning as L

from sdtune.config.overrides import hydra_quote

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
AFTER_TRAINING = "final renders"  # GracefulStop.stopped_in when a signal came once training was over


class StopNow(BaseException):
    """A second Ctrl-C: leave at once. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it; not a KeyboardInterrupt, which Lightning turns
    into its own message and exit status 1. :func:`sdtune.run.train.train` reports it."""


class _RenderInterrupted(BaseException):
    """Raised by the handler into the end-of-run render that is running (see :func:`final_render`)."""


def writes_outputs(trainer: L.Trainer) -> bool:
    """Whether this process writes the run's files: rank 0 only, and never in a ``fast_dev_run``
    (Lightning's smoke test writes no checkpoints; nor do we write LoRAs, samples or reports)."""
    return trainer.is_global_zero and not trainer.fast_dev_run


def graceful_stop(trainer: L.Trainer) -> GracefulStop | None:
    return next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)


def stopped_early(trainer: L.Trainer) -> bool:
    """Whether a stop was asked for: ``fit`` ended before ``max_steps``, or the final renders are skipped."""
    stop = graceful_stop(trainer)
    return stop is not None and bool(stop.signal_name)


class final_render:  # noqa: N801 (used as a context manager, like contextlib's)
    """``with final_render(trainer) as go: if go: <render>``: an end-of-run render (samples, concept
    probe, last evaluation). ``go`` is false when a stop was asked for; a Ctrl-C or SIGTERM during
    the render ends it at once (the callback then simply returns), and the run goes on to write
    what is left (LoRA, summary) and exits with the signal's status."""

    def __init__(self, trainer: L.Trainer):
        self.stop = graceful_stop(trainer)

    def __enter__(self) -> bool:
        if self.stop is None:
            return True
        self.stop.finish()
        if self.stop.signal_name:
            return False
        self.stop._rendering = True
        return True

    def __exit__(self, kind, value, traceback) -> bool:
        if self.stop is not None:
            self.stop._rendering = False
        return kind is _RenderInterrupted  # the render is abandoned; nothing else is hidden


class GracefulStop(L.Callback):
    """See the module docstring. ``exit_code`` is the shell's for the signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.requested: int | None = None
        self.signal_name: str | None = None
        self.stopped_in: str | None = None  # "training", or AFTER_TRAINING
        self.finishing = False  # training is over (or was skipped): only the final renders and writes are left
        self._rendering = False
        self._stopping_now = False
        self._previous: dict[int, object] = {}
        self._active = False
        self._step_at_batch_start = -1

    @property
    def exit_code(self) -> int:
        return 128 + int(self.requested or 0)

    def _handle(self, signum, frame) -> None:
        if self._stopping_now:  # a second Ctrl-C is already ending the run
            return
        if not self._active:  # left installed by an aborted fit: behave as the defaults do
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            sys.exit(128 + signum)
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested is not None:  # the second Ctrl-C: stop now
            self._stopping_now = True
            raise StopNow(name)
        self.requested = signum
        if self.finishing:
            self._mark(AFTER_TRAINING)
            print(f"\n{name}: training is finished; skipping the final renders, keeping the checkpoint and "
                  "writing the LoRA and summary.json (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
            if self._rendering:
                self._rendering = False
                raise _RenderInterrupted
            return
        print(f"\n{name}: stopping after this step, with a checkpoint and the LoRA "
              "(Ctrl-C again stops at once, saving nothing)", file=sys.stderr, flush=True)

    def _mark(self, where: str) -> None:
        if not self.signal_name:
            self.signal_name = signal.Signals(self.requested or signal.SIGTERM).name
            self.stopped_in = where

    def finish(self) -> None:
        """Training is over (or, resuming a finished run, was skipped): a stop asked for from now
        on, or already asked for, skips the final renders."""
        self.finishing = True
        if self.requested is not None:
            self._mark(AFTER_TRAINING)

    def restore(self) -> None:
        """Put the handlers found at ``setup`` back. Lightning re-installs the ones it found when fit
        started (ours) in its own teardown, so :func:`sdtune.run.train.train` calls this once ``fit`` has
        returned or raised."""
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
        self._mark("training")
        for callback in trainer.checkpoint_callbacks:
            if hasattr(callback, "save_now"):
                callback.save_now(trainer)
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.finish()  # training is over: a signal now skips the final renders

    def resume_command(self) -> str:
        return f"python -m sdtune {shlex.quote('ckpt_path=' + hydra_quote(str(self.run_dir)))}"

    def resumable(self, trainer) -> bool:
        """Whether this run writes checkpoints, so that the resume command continues it."""
        return any(hasattr(c, "save_now") for c in trainer.checkpoint_callbacks)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # After every on_fit_end and summary.json (RunSummary.teardown): the last word. Lightning
        # calls it only when fit did not raise. The handlers stay ours until train() restores them
        # once fit has returned, so a Ctrl-C while the loggers close is still ours too.
        if not (self.signal_name and trainer.is_global_zero):
            return
        step = trainer.global_step
        if self.stopped_in == AFTER_TRAINING:
            head = (f"\nstopped by {self.signal_name} after training finished (step {step}): the final renders "
                    f"(samples.png and the like) were skipped; the LoRA and summary.json are in {self.run_dir}.")
            if self.resumable(trainer):
                print(f"{head} Draw the samples by resuming (it trains nothing more, renders them and "
                      f"rewrites summary.json):\n  {self.resume_command()}", file=sys.stderr, flush=True)
            else:
                lora = hydra_quote(str(self.run_dir / "lora.safetensors"))
                print(f"{head} Checkpoints are off (callbacks.model_checkpoint=null); draw samples from the LoRA "
                      f"with:\n  python -m sdtune.generate {shlex.quote(f'loras=[{lora}]')} prompt=... compare=true",
                      file=sys.stderr, flush=True)
            return
        if not self.resumable(trainer):
            print(f"\nstopped by {self.signal_name} at step {step}; checkpoints are off "
                  "(callbacks.model_checkpoint=null), so this run cannot be continued.", file=sys.stderr, flush=True)
            return
        print(f"\nstopped by {self.signal_name} at step {step}; the checkpoint and the LoRA of "
              f"that step are in {self.run_dir}. Continue with:\n  {self.resume_command()}", file=sys.stderr, flush=True)

    def stopped_message(self, step: int) -> str:
        """What :func:`sdtune.run.train.train` reports (exit status :attr:`exit_code`) for a stop that saved."""
        if self.stopped_in == AFTER_TRAINING:
            return f"run stopped by {self.signal_name} during the final renders; training finished (step {step})"
        return f"run stopped by {self.signal_name} at step {step}"

    def stopped_at_once_message(self, step: int) -> str:
        """What a second Ctrl-C leaves behind: every file written before it is complete (writes are atomic)."""
        kept = [name for name in ("lora.safetensors", "summary.json") if (self.run_dir / name).is_file()]
        checkpoints = [p for p in (self.run_dir / "checkpoints").glob("*.ckpt") if not p.name.startswith(".")] \
            if (self.run_dir / "checkpoints").is_dir() else []
        text = f"stopped at once by a second Ctrl-C (at step {step}); nothing more was saved."
        if checkpoints:
            text += (f" The last complete checkpoint{' and ' + ', '.join(kept) if kept else ''} stay in {self.run_dir}. "
                     f"Continue with:\n  {self.resume_command()}")
        else:
            text += " No checkpoint had been written yet: run the same command again to start over."
        return text

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not isinstance(exception, StopNow):  # stopping at once: further Ctrl-Cs are ignored until train() returns
            self.restore()
