"""Where a base model comes from: a local folder or file, or a hub id (checked once, quickly).

Without this, an unreachable hub makes diffusers retry every file with back-off, and a missing
model takes minutes to report. We check reachability once, fall back to the local hub cache, and
otherwise fail at once with the fix.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.utils.errors import ModelLoadError

_HINT = (
    "Fix: set model.path to a local diffusers folder (the one holding model_index.json) or a hub id "
    "you can download, or run `python -m sdtune experiment=quickstart` to try sdtune on a tiny built-in model."
)


#: Weight formats loaded through Python's pickle, which can run any code while loading.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFE_WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _looks_local(path: str) -> bool:
    """Hub ids are exactly ``owner/name``; anything else is meant as a file or folder."""
    return (
        path.startswith(("/", ".", "~"))
        or "\\" in path
        or path.count("/") != 1
        or path.endswith((".safetensors", *PICKLE_SUFFIXES))
    )


#: Names diffusers' and transformers' ``from_pretrained`` read a part's pickle weights from
#: (``diffusion_pytorch_model.bin``, ``pytorch_model-00001-of-00007.bin``, ...).
PICKLE_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "pytorch_model")
SAFE_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model")


#: Parts of a pipeline folder that sdtune never loads (the pipelines are built without them), so
#: pickle weights there are never read: an older SD1.5 folder's safety checker, for one.
UNLOADED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")


def pickle_weights(path: str | Path) -> list[Path]:
    """The pickle-format weight files a loader would read at ``path``: the file itself when it is
    one, or, in a model folder, those of every part (the folder or a subfolder such as ``unet/``)
    whose weights are only pickles (diffusers and transformers load a part's .safetensors when it
    has one). Empty for a hub id, a missing path or a folder with safe weights."""
    local = Path(str(path)).expanduser()
    if local.is_file():  # a single file is loaded with torch.load unless it is one of the safe formats
        return [] if local.suffix.lower() in SAFE_WEIGHT_SUFFIXES else [local]
    if not local.is_dir():
        return []
    found: list[Path] = []
    try:
        parts = [local, *sorted(p for p in local.iterdir() if p.is_dir() and not p.name.startswith(".")
                                and p.name not in UNLOADED_PARTS)]
        for part in parts:
            files = [f for f in part.iterdir() if not f.name.startswith(".") and f.is_file()]
            weights = [f for f in files if f.name.startswith(PICKLE_WEIGHT_PREFIXES)]
            pickles = [f for f in weights if f.suffix.lower() in PICKLE_SUFFIXES]
            safe = [f for f in files if f.suffix.lower() in SAFE_WEIGHT_SUFFIXES and f.name.startswith(SAFE_WEIGHT_PREFIXES)]
            if pickles and not safe:
                found += sorted(pickles)
    except OSError:  # unreadable: the loader reports it with its own context
        return found
    return found


def check_weights(path: str | Path | None, *, key: str, allow_pickle: bool, origin: str = "") -> None:
    """The one loading gate for every model sdtune loads (base model, VAE, ControlNet, CLIP/DINO
    evaluators): refuse pickle-format weights (:func:`pickle_weights`) unless the user set
    ``model.allow_pickle=true`` on the command line of this run. ``origin`` says where a path
    came from when a file named it (a LoRA header); such a path is never loaded as a pickle."""
    if path in (None, ""):
        return
    found = pickle_weights(path)
    if not found or (allow_pickle and not origin):
        return
    local = Path(str(path)).expanduser()
    what = "a pickle-based checkpoint" if local.is_file() else (
        "a model folder whose weights are only pickles (" + ", ".join(str(f.relative_to(local)) for f in found[:3])
        + (", ..." if len(found) > 3 else "") + ")")
    if origin:
        raise ModelLoadError(
            f"{key}={str(path)!r} ({origin}) is {what}; loading one can run arbitrary code, and a path read from a "
            "file is never loaded as a pickle. Fix: use a base model with .safetensors weights, or, if you trust "
            "that file, give the model on the command line yourself (e.g. model=sd15 model.path=<file> "
            "model.allow_pickle=true)."
        )
    raise ModelLoadError(
        f"{key}={str(path)!r} is {what}; loading one can run arbitrary code. Fix: use .safetensors weights "
        "(a .safetensors file, or a folder saved with safetensors), or set model.allow_pickle=true on the command "
        "line if you trust where it came from."
    )


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
    check_weights(path, key="model.path", allow_pickle=allow_pickle)
    if local.exists():
        return str(local)
    if _looks_local(path):
        raise ModelLoadError(f"Could not load the {family} base model: model.path={path!r} does not exist.\n{_HINT}")
    from huggingface_hub import model_info, snapshot_download

    try:
        model_info(path, revision=revision, timeout=15)
        return path  # reachable: from_pretrained downloads just the files it needs
    except Exception as online_err:  # offline, unknown repo, gated repo
        reason = str(online_err).splitlines()[0] if str(online_err) else type(online_err).__name__
        failure = f"{type(online_err).__name__}: {reason}"
    try:
        cached = snapshot_download(path, revision=revision, local_files_only=True, cache_dir=cache_dir)
    except Exception:
        raise ModelLoadError(
            f"Could not load the {family} base model from model.path={path!r}: the hub is not reachable "
            f"or has no such model ({failure}), and it is not in the local hub cache.\n{_HINT}"
        ) from None
    check_weights(cached, key="model.path", allow_pickle=allow_pickle)
    return cached
