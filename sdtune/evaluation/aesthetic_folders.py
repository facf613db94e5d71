"""What makes a folder a LAION aesthetic predictor, read without loading a model.

:func:`predictor_problem` reads ``config.json`` and the safetensors headers only (no torch model,
no transformers import), so the config checks of a run (``eval.aesthetic_model``) and the data
stage's recipe check can call it at start-up without paying for transformers' import. The models
themselves are in :mod:`sdtune.evaluation.aesthetics`.
"""

from __future__ import annotations

import json
from pathlib import Path

#: the head's Linear layers' weight names, by which a folder without ``architectures`` is recognised
HEAD_KEYS = {
    "AestheticsPredictorV1": {"predictor.weight"},
    "AestheticsPredictorV2Linear": {f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)},
    "AestheticsPredictorV2ReLU": {f"layers.{i}.weight" for i in (0, 3, 6, 9, 11)},
}
FIX = ("Fix: a folder of simple-aesthetics-predictor's layout (e.g. shunk031/aesthetics-predictor-v2-sac-logos-ava1-"
       "l14-linearMSE, downloaded with `huggingface-cli download <id> --local-dir <folder>`): config.json, "
       "preprocessor_config.json and .safetensors weights")


def _weight_names(folder: Path) -> set[str]:
    """The tensor names in the folder's safetensors files (headers only; nothing is loaded)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            names |= set(fh.keys())
    return names


def predictor_problem(folder: Path) -> tuple[str | None, str | None]:
    """``(architecture, None)`` for a predictor folder, else ``(None, what is wrong)``. Reads only
    config.json and the weights' headers, so the stage and the config checks can call it early."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"has no readable config.json ({type(err).__name__})"
    if config.get("model_type") != "clip_vision_model":
        return None, f"is no CLIP vision predictor (config.json model_type {config.get('model_type')!r}, not 'clip_vision_model')"
    names = _weight_names(folder)
    archs = [a for a in config.get("architectures") or [] if a in HEAD_KEYS]
    if not archs:
        archs = [a for a, keys in HEAD_KEYS.items() if names and keys <= names]
        if not archs:
            return None, (f"names no aesthetic head (config.json architectures {config.get('architectures')!r}, not one "
                          f"of {sorted(HEAD_KEYS)}, and its .safetensors weights hold no head)")
    arch = archs[-1]  # V2ReLU's keys are no subset of V2Linear's, nor the reverse
    if names and not HEAD_KEYS[arch] <= names:
        return None, f"says {arch} in config.json, but its weights lack {sorted(HEAD_KEYS[arch] - names)}"
    if not (folder / "preprocessor_config.json").is_file():
        return None, "has no preprocessor_config.json (the CLIP image processor's settings)"
    return arch, None
