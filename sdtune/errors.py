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


class OutputError(SdtuneError):
    """A result could not be written: a read-only folder, a full disk."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For command-line entry points: an :class:`SdtuneError` is printed as ``error: <message>``
    (no traceback) and the process exits with status 2; any other exception is a bug and keeps
    its traceback."""
    try:
        yield
    except SdtuneError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(2)
