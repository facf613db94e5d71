"""The one error type the stage reports to the user (message, no traceback, exit code).

Anything the user can fix (a missing folder, a bad recipe, an OUT folder we must not replace)
raises :class:`PipelineError`; ``__main__`` prints its message and exits with its code.
Bad images are never errors: they are dropped with a reason instead.
"""

from __future__ import annotations

USAGE_EXIT = 2  # wrong arguments, input layout or recipe: fix and rerun
RUN_EXIT = 1  # the run itself failed (data-juicer crashed, nothing survived)


class PipelineError(Exception):
    """A user-facing failure: ``str(err)`` is the whole message, ``err.code`` the exit status."""

    def __init__(self, message: str, code: int = USAGE_EXIT):
        super().__init__(message)
        self.code = code
