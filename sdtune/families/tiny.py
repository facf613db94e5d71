"""Random-initialised miniature base models in real diffusers folder layout.

The demo and the tests cannot download weights, yet they must exercise the exact loading code a
real model goes through. So each family builds its real classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, ...) at toy sizes with locally trained tokenizers and saves the lot
with ``save_pretrained`` as a diffusers folder (``ModelFamily.build_tiny``); the family's ordinary
``load`` reads it back. This module owns where they are built and when they are rebuilt.

A folder is built once and reused; it is written to a temporary sibling and renamed into place,
so concurrent builders (parallel test workers) never see a half-written model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sdtune.config.paths import ROOT
from sdtune.families import get_family
from sdtune.utils.errors import ModelLoadError

log = logging.getLogger(__name__)

# Bump when a builder changes shape, so stale cached folders are rebuilt rather than reused.
TINY_FORMAT_VERSION = "3"
_MARKER = "sdtune_tiny.json"


def tiny_cache_root() -> Path:
    """The only folder tiny models are ever built in: ``$SDTUNE_CACHE``, else ``<repo>/.cache``
    (the same rule as ``paths.cache_dir`` in ``conf/paths/default.yaml``)."""
    return Path(os.path.realpath(os.environ.get("SDTUNE_CACHE") or ROOT / ".cache"))


def in_tiny_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) lies inside :func:`tiny_cache_root`."""
    real, root = Path(os.path.realpath(Path(path).expanduser())), tiny_cache_root()
    return real != root and root in real.parents


def read_marker(folder: Path) -> dict | None:
    """The build marker of a tiny folder, or None when there is none (or it is not ours)."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and set(marker) == {"family", "version"} else None


def ensure_tiny_model(family: str, folder: str | os.PathLike) -> Path:
    """Return ``folder`` holding the tiny ``family`` model, building it first if needed.

    Only a folder this function built (it carries our marker) is ever replaced; an existing folder
    without the marker is refused, never deleted, whatever it holds.
    """
    folder = Path(folder).expanduser()
    expected = {"family": family, "version": TINY_FORMAT_VERSION}
    marker = read_marker(folder)
    if marker == expected:
        return folder

    builder = get_family(family).build_tiny  # an unknown family fails here, naming the known ones
    if folder.exists() and (marker is None or not folder.is_dir()) and not _is_empty_dir(folder):
        raise ModelLoadError(
            f"{folder} exists but was not built by sdtune (no {_MARKER} in it), so it is not replaced by a tiny "
            "model. Fix: move it away, or point model.path (or SDTUNE_CACHE) at another folder."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        builder(tmp)
        (tmp / _MARKER).write_text(json.dumps(expected))
        if read_marker(folder) == expected:  # another process (a test worker) built it meanwhile: keep theirs
            return folder
        if folder.exists():  # empty, or our own stale build from an older version: replace it
            stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process won the race and its folder is already in place.
            if read_marker(folder) != expected:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def prepare_tiny(model_cfg) -> None:
    """Build the tiny model a config asks for (``model.tiny``), but only inside our cache.

    ``model.tiny`` and ``model.path`` also arrive from LoRA headers, which anyone can write, and
    from overrides such as ``experiment=quickstart model.path=/my/model``. So a path outside
    :func:`tiny_cache_root` is never built, created or replaced: it is loaded as the ordinary
    model folder it names (and a missing one fails as missing).
    """
    if not model_cfg.get("tiny"):
        return
    path = str(model_cfg["path"])
    if in_tiny_cache(path):
        ensure_tiny_model(model_cfg["family"], path)
    else:
        log.info("model.path=%s is outside the tiny-model cache %s: loading it as an ordinary model", path, tiny_cache_root())
