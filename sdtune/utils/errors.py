"""User-facing errors.

Every problem a user can fix by changing an input (a config value, a data file, a model path)
is raised as an :class:`SdtuneError`. The command-line entry points print its message without a
traceback and exit with status 2, so the message itself must name the offending thing and the fix.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class SdtuneError(Exception):
    """Base class for errors caused by user input; the message is shown as-is."""


class ConfigError(SdtuneError):
    """A config value is missing, mistyped or out of range."""


class DataError(SdtuneError):
    """The training data folder or its metadata is unusable."""


class ModelLoadError(SdtuneError):
    """A base model could not be loaded from ``model.path``."""


class LoraFileError(SdtuneError):
    """A LoRA file or training checkpoint is unreadable or does not fit the base model."""


class NonFiniteLossError(SdtuneError):
    """The training loss became NaN or infinite."""

    @classmethod
    def at(cls, loss: float, step: int, *, lr: float | None, noticed: int | None = None,
           before: str | None = None) -> NonFiniteLossError:
        """The error for ``loss`` at optimizer step ``step``, with the known causes and what to do.

        ``step`` counts the optimizer steps done before the bad one (``trainer.global_step`` then).
        ``noticed``: the steps done when the device-side record was read (:mod:`sdtune.training.nonfinite`);
        ``before``: what the check came before (a checkpoint, the LoRA), which was then not written.
        """
        when = ""
        if noticed is not None:
            what = f"before {before}" if before else f"at the check after {noticed} steps"
            when = f" (noticed {what}; no weights updated at step {step} or later were saved)"
        return cls(
            f"training stopped: the loss is {loss} at step {step}{when}. Known causes: the stock SDXL VAE in "
            "fp16 (set model.vae_path to the fp16-fix VAE, or trainer.precision=bf16-mixed); a learning rate "
            f"too high (optim.optimizer.lr={lr}); fp16 overflow (try "
            "trainer.precision=bf16-mixed). The last good checkpoint is kept in the run's checkpoints/ folder; "
            "resume from it with ckpt_path=..., or set trainer.skip_nonfinite=true to skip and count such steps."
        )


class RunStopped(SdtuneError):
    """The run was stopped by a signal after saving its state (see :mod:`sdtune.training.stopping`)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class OutputError(SdtuneError):
    """A result could not be written: a read-only folder, a full disk."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For command-line entry points: an :class:`SdtuneError` is printed as ``error: <message>``
    (no traceback) and the process exits with status 2; any other exception is a bug and keeps
    its traceback."""
    try:
        yield
    except RunStopped as err:  # not an error: the run saved its state and said how to continue
        print(f"\n{err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SdtuneError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(2)
