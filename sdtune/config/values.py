"""One set of value checks for every config: numbers, integer and float ranges, choices, switches,
paths and guidance scales.

Training's sections, generate, merge, morph and evaluation check their settings here, so a mistake
reads the same wherever it is made: a :class:`~sdtune.utils.errors.ConfigError` naming the key,
the value it got, what is accepted and, where the caller gives one, the fix. Nothing here imports
torch or a model library, so a check costs microseconds and runs before anything loads.

The messages::

    lora.rank must be an integer >= 1, got 'abc'. Fix: e.g. lora.rank=16.      (the wrong kind)
    lora.rank must be >= 1, got 0. Fix: e.g. lora.rank=16.                     (out of range)
    optim.optimizer.lr must be a finite number, got nan.
    strength must be a number from 0 to 1, got 1.5. Fix: e.g. strength=0.5.
    eval.every_n_steps must be an integer >= 1 or null (evaluate at each validation), got 0.

An out-of-range value gets the short form (its kind is evidently right) unless the message has to
say more than the bound: a closed range ("a number from 0 to 1"), a null that is accepted too and
described (``optional="what null means"``), or ``full=True``.

``Settings(cfg)`` reads a config's settings by dotted key and checks them with the same functions:
``Settings(cfg).integer("lora.rank", ge=1)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdtune.utils.errors import ConfigError

#: What :func:`path` can require of a path.
PATH_KINDS = ("exist", "file", "folder")


def setting(cfg: Any, key: str) -> Any:
    """``cfg``'s value at the dotted ``key``; None where it is absent (or ``???``)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def _show(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _fix(fix: str) -> str:
    return f" Fix: {fix}" if fix else ""


def _accepted(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    """The range in words: ``>= 1``, ``> 0``, ``from 0 to 1``, ``in [0, 1)``, ``""`` (any)."""
    low = (">=", ge) if ge is not None else (">", gt) if gt is not None else None
    high = ("<=", le) if le is not None else ("<", lt) if lt is not None else None
    if low and high:
        if low[0] == ">=" and high[0] == "<=":
            return f"from {_show(low[1])} to {_show(high[1])}"
        return f"in {'[' if low[0] == '>=' else '('}{_show(low[1])}, {_show(high[1])}{']' if high[0] == '<=' else ')'}"
    if low or high:
        op, bound = low or high
        return f"{op} {_show(bound)}"
    return ""


def _inside(value: float, ge: float | None, gt: float | None, le: float | None, lt: float | None) -> bool:
    return ((ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le) and (lt is None or value < lt))


def _refused(key: str, kind: str, accepted: str, optional: bool | str, got: str, fix: str) -> ConfigError:
    null = f" or null ({optional})" if isinstance(optional, str) else " or null" if optional else ""
    what = " ".join(part for part in (kind, accepted) if part)
    return ConfigError(f"{key} must be {what}{null}, got {got}.{_fix(fix)}")


def _check_range(key: str, value: float, kind: str, bounds: tuple, optional: bool | str, fix: str, full: bool) -> None:
    if _inside(value, *bounds):
        return
    accepted = _accepted(*bounds)
    if full or isinstance(optional, str) or accepted.startswith("from"):
        raise _refused(key, kind, accepted, optional, str(value), fix)
    raise _refused(key, "", accepted, False, str(value), fix)


def number(key: str, value: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, optional: bool | str = False, fix: str = "", full: bool = False) -> float | None:
    """``value`` as a finite float within the bounds (``ge``: >=, ``gt``: >, ``le``: <=, ``lt``: <).

    ``optional``: None is accepted (and returned); a text says what null means, for the message.
    ``fix``: what to do instead, e.g. ``"e.g. lora.alpha=16."``.
    """
    if value is None and optional:
        return None
    bounds = (ge, gt, le, lt)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refused(key, "a number", _accepted(*bounds), optional, repr(value), fix)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}.{_fix(fix)}")
    _check_range(key, value, "a number", bounds, optional, fix, full)
    return float(value)


def integer(key: str, value: Any, *, ge: int | None = None, gt: int | None = None, le: int | None = None,
            lt: int | None = None, optional: bool | str = False, fix: str = "", full: bool = False,
            kind: str = "an integer") -> int | None:
    """``value`` as an int within the bounds (as :func:`number`; ``kind`` names it in messages:
    ``"a whole number"`` where the users are not programmers)."""
    if value is None and optional:
        return None
    bounds = (ge, gt, le, lt)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refused(key, kind, _accepted(*bounds), optional, repr(value), fix)
    _check_range(key, value, kind, bounds, optional, fix, full)
    return value


def guidance(key: str, value: Any, *, optional: bool | str = False, fix: str = "") -> float | None:
    """A classifier-free guidance scale: a finite number > 0 (1 turns guidance off)."""
    return number(key, value, gt=0, optional=optional, fix=fix, full=True)


def choice(key: str, value: Any, choices: Iterable[Any], *, said: str | None = None, fix: str = "") -> Any:
    """``value`` when it is one of ``choices``; ``said`` words them for the message
    (``"true, false or auto"``), else they are listed."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} must be {said or f'one of {list(choices)}'}, got {value!r}.{_fix(fix)}")
    return value


def boolean(key: str, value: Any, *, optional: bool = False, fix: str = "") -> bool | None:
    """``value`` when it is true or false (None too when ``optional``: the setting is off)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.{_fix(fix)}")
    return value


def path(key: str, value: Any, *, must: str = "exist", fix: str = "") -> Path:
    """``value`` as a Path (``~`` expanded) that exists (``must="exist"``), is a file (``"file"``)
    or is a folder (``"folder"``). Only looked at, never opened."""
    if must not in PATH_KINDS:
        raise ValueError(f"must={must!r} is not one of {PATH_KINDS}")
    if value is None or str(value) == "":
        raise ConfigError(f"{key} is not set.{_fix(fix)}")
    found = Path(str(value)).expanduser()
    if must == "file" and not found.is_file():
        problem = "is a folder, not a file" if found.is_dir() else "is not a file"
    elif must == "folder" and not found.is_dir():
        problem = "is a file, not a folder" if found.exists() else "is not a folder"
    elif must == "exist" and not found.exists():
        problem = "does not exist"
    else:
        return found
    raise ConfigError(f"{key}={str(value)!r} {problem}.{_fix(fix)}")


class Settings:
    """A config's settings read by dotted key and checked with this module's functions:
    ``Settings(cfg).number("lora.alpha", gt=0, optional=True)``. Absent keys read as None."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def get(self, key: str) -> Any:
        return setting(self.cfg, key)

    def number(self, key: str, **kwargs: Any) -> float | None:
        return number(key, self.get(key), **kwargs)

    def integer(self, key: str, **kwargs: Any) -> int | None:
        return integer(key, self.get(key), **kwargs)

    def guidance(self, key: str, **kwargs: Any) -> float | None:
        return guidance(key, self.get(key), **kwargs)

    def choice(self, key: str, choices: Iterable[Any], **kwargs: Any) -> Any:
        return choice(key, self.get(key), choices, **kwargs)

    def boolean(self, key: str, **kwargs: Any) -> bool | None:
        return boolean(key, self.get(key), **kwargs)

    def path(self, key: str, **kwargs: Any) -> Path:
        return path(key, self.get(key), **kwargs)
