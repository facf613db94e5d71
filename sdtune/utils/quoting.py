"""Quoting a value for the commands sdtune prints (resume, generate): a Hydra override value that a
user can paste back into the shell as it is.

Kept in utils because both the run's stop message (training/) and resuming (run/) write such
commands, and neither should import the other for it.
"""

from __future__ import annotations


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra override value: as is when plain, else single-quoted with escapes
    (a run folder like ``lora.rank=8,seed=1`` would otherwise be parsed as a list)."""
    if all(c.isalnum() or c in "/._-:" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
