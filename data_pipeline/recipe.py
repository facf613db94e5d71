"""Load a recipe (a data-juicer config YAML) and turn it into the config for one run.

A recipe needs ``process:``, a list of ``{op_name: {params}}``. It may set any other data-juicer
option (``np``, ``executor_type``, ``ray_address``, ...). The keys in ``FORCED`` are always set by
the stage, because it owns the input file, the output file, the work folder and the tracer that
attributes every drop; a recipe's values for them are ignored (``np`` comes from ``--np`` first).

Validation also refuses an op whose ``min_X`` is above its ``max_X`` (recipe values over the op's
defaults, sizes like ``8KB`` compared in bytes): such a filter would silently drop every image.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from data_pipeline.dj import load_data_juicer
from data_pipeline.errors import PipelineError
from data_pipeline.models import IN_PROCESS_OPS, MODEL_PARAMS, check_recipe_models
from data_pipeline.reasons import effective_params

RECIPES = Path(__file__).resolve().parent / "recipes"
CONF = Path(__file__).resolve().parents[1] / "conf"


def training_default_model() -> str:
    """The model family training uses when none is given (``model:`` in conf/config.yaml's defaults):
    the stage cleans for the same family unless told otherwise."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text(encoding="utf-8"))["defaults"]
    return next(d["model"] for d in defaults if isinstance(d, dict) and "model" in d)


DEFAULT_MODEL = training_default_model()


def model_recipe(model: str) -> Path:
    """The shipped recipe for a model family (``recipes/<model>.yaml``: its training size)."""
    path = RECIPES / f"{model}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem not in ("full", "ray", "models"))
        raise PipelineError(f"no recipe for MODEL={model!r}; shipped: {', '.join(shipped)}. "
                            f"Fix: MODEL={'|'.join(shipped)}, or name a recipe with RECIPE=<file>.")
    return path


DEFAULT_RECIPE = model_recipe(DEFAULT_MODEL)
FORCED = (
    "dataset_path", "export_path", "work_dir", "np", "open_tracer", "trace_num", "op_list_to_trace",
    "text_keys", "image_key", "keep_stats_in_res_ds", "export_shard_size", "ds_cache_dir", "dataset", "job_id",
)  # fmt: skip


def load_recipe(path: str | os.PathLike) -> dict:
    """The parsed recipe; any problem is a :class:`PipelineError` naming the file."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in RECIPES.glob("*.yaml")))
        raise PipelineError(f"recipe file {path} does not exist. Recipes shipped in {RECIPES}: {shipped}.")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise PipelineError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("process"), list):
        raise PipelineError(
            f"recipe {path} must be a YAML mapping with a 'process:' list of data-juicer operators, e.g.\n"
            "process:\n  - image_shape_filter:\n      min_width: 1024"
        )
    for n, item in enumerate(recipe["process"], 1):
        if not (isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), dict | None)):
            raise PipelineError(
                f"recipe {path}: process entry {n} must be one 'op_name: {{params}}' mapping, got {item!r}."
            )
    return recipe


def validate_recipe(recipe: dict, path: str | os.PathLike) -> None:
    """Check op names, parameter names and types with data-juicer's own preflight check."""
    load_data_juicer()  # registers sdtune's operators before the check
    from data_juicer.core.preflight import PipelineConfigError, pre_instantiation_check

    try:
        pre_instantiation_check(recipe["process"])
    except PipelineConfigError as err:
        lines = "\n".join(f"  - {e}" for e in err.errors)
        raise PipelineError(f"recipe {path} is not valid:\n{lines}") from None
    check_min_max(recipe, path)
    check_recipe_models(op_list(recipe), path)  # a missing or broken model fails here, before any image is read
    executor = recipe.get("executor_type", "default")
    if executor not in ("default", "local", "ray", "ray_partitioned"):
        raise PipelineError(f"recipe {path}: executor_type {executor!r} is not one of default, ray, ray_partitioned.")


def _as_number(value) -> float | None:
    """A min/max bound as a number (``"8KB"`` in bytes), or None when it cannot be compared."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        from data_juicer.utils.mm_utils import size_to_bytes

        try:
            return float(size_to_bytes(value))
        except (ValueError, TypeError, KeyError):
            return None
    return None


def check_min_max(recipe: dict, path: str | os.PathLike) -> None:
    """Refuse an op whose ``min_X`` exceeds its ``max_X`` (e.g. ``min_ratio: 2.0, max_ratio: 0.5``)."""
    for n, (name, params) in enumerate(op_list(recipe), 1):
        values = effective_params(name, params)
        for low_key in [k for k in values if k.startswith("min_")]:
            high_key = "max_" + low_key[len("min_") :]
            if high_key not in values or not ({low_key, high_key} & set(params)):
                continue
            low, high = _as_number(values[low_key]), _as_number(values[high_key])
            if low is None or high is None or low <= high:
                continue
            shown = {k: f"{k} {values[k]}" + ("" if k in params else " (its default)") for k in (low_key, high_key)}
            fix = (
                f"swap them ({low_key}: {values[high_key]}, {high_key}: {values[low_key]})"
                if low_key in params and high_key in params
                else f"set {low_key} and {high_key} so that {low_key} is at most {high_key}"
            )
            raise PipelineError(
                f"recipe {path}: {name} (process entry {n}) has {shown[low_key]} above {shown[high_key]}, "
                f"so it would drop every image. Fix: {fix}."
            )


def op_list(recipe: dict) -> list[tuple[str, dict]]:
    """``[(op_name, params)]`` in recipe order (params ``{}`` when none are given)."""
    return [(name, dict(params or {})) for item in recipe["process"] for name, params in item.items()]


def resolve_np(cli_np: int | None, recipe: dict) -> int:
    """``--np`` wins, then the recipe's ``np``, then 1."""
    value = cli_np if cli_np is not None else recipe.get("np") or 1
    if not isinstance(value, int) or value < 1:
        raise PipelineError(f"np must be a positive integer, got {value!r}.")
    return value


def _op_params(name: str, params: dict | None, recipe: dict) -> dict | None:
    """An op's params as data-juicer gets them.

    * A model op's model path has ``~`` expanded (the model check expands it; data-juicer's loader would
      take ``~/models/x`` for a Hub id and fail after the cheap filters ran).
    * An sdtune model op gets ``skip_op_error: false`` unless the op or the recipe's top level set it:
      data-juicer's default (true) drops a whole batch silently when one sample raises; the stage
      reports the error instead.
    """
    params = dict(params or {})
    param = MODEL_PARAMS.get(name, (None,))[0]
    if isinstance(params.get(param), str) and params[param].startswith("~"):
        params[param] = os.path.expanduser(params[param])
    if name in IN_PROCESS_OPS and "skip_op_error" not in params and "skip_op_error" not in recipe:
        params["skip_op_error"] = False
    return params or None


def build_config(recipe: dict, *, work: Path, dataset: Path, export: Path, np_workers: int, n_samples: int) -> dict:
    """The full data-juicer config for one run: the recipe plus the ``FORCED`` keys."""
    cfg = {k: v for k, v in recipe.items() if k not in FORCED}
    cfg["process"] = [{name: _op_params(name, params, recipe)} for item in recipe["process"] for name, params in item.items()]
    cfg.setdefault("project_name", "sdtune-data")
    cfg.setdefault("open_monitor", False)
    cfg.update(
        dataset_path=str(dataset),
        export_path=str(export),
        work_dir=str(work / "dj"),
        ds_cache_dir=str(work / "hf-cache"),
        np=np_workers,
        open_tracer=True,
        trace_num=max(1, n_samples),
        op_list_to_trace=[],
        text_keys="text",
        image_key="images",
        keep_stats_in_res_ds=False,
        export_shard_size=0,
    )
    return cfg
