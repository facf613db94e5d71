"""Where a base model comes from: a local folder or file, or a hub id (checked once, quickly).

Without this, an unreachable hub makes diffusers retry every file with back-off, and a missing
model takes minutes to report. We check reachability once, fall back to the local hub cache, and
otherwise fail at once with the fix.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

_HINT = (
    "Fix: set model.path to a local diffusers folder (the one holding model_index.json) or a hub id "
    "you can download, or run `python -m sdtune experiment=quickstart` to try sdtune on a tiny built-in model."
)


def _looks_local(path: str) -> bool:
    """Hub ids are exactly ``owner/name``; anything else is meant as a file or folder."""
    return (
        path.startswith(("/", ".", "~"))
        or "\\" in path
        or path.count("/") != 1
        or path.endswith((".safetensors", ".ckpt", ".bin", ".pt"))
    )


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def resolve_model_source(
    path: str,
    *,
    family: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    allow_pickle: bool = False,
) -> str:
    """A local path for ``path``, or the hub id itself when the hub is reachable."""
    local = Path(path).expanduser()
    if local.is_file() and local.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"model.path={path!r} is a pickle-based checkpoint; loading one can run arbitrary code. "
            "Fix: use a .safetensors file, or set model.allow_pickle=true if you trust where it came from."
        )
    if local.exists():
        return str(local)
    if _looks_local(path):
        raise ModelLoadError(f"Could not load the {family} base model: model.path={path!r} does not exist.\n{_HINT}")
    from huggingface_hub import model_info, snapshot_download

    try:
        model_info(path, revision=revision, timeout=15)
        return path  # reachable: from_pretrained downloads just the files it needs
    except Exception as online_err:  # offline, unknown repo, gated repo
        try:
            return snapshot_download(path, revision=revision, local_files_only=True, cache_dir=cache_dir)
        except Exception:
            reason = str(online_err).splitlines()[0] if str(online_err) else type(online_err).__name__
            raise ModelLoadError(
                f"Could not load the {family} base model from model.path={path!r}: the hub is not reachable "
                f"or has no such model ({type(online_err).__name__}: {reason}), and it is not in the local "
                f"hub cache.\n{_HINT}"
            ) from None
