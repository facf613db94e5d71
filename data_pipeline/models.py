"""The models a recipe's operators load, checked before any image is read.

Captioners, taggers and model-based filters name a model in one parameter (``model``,
``hf_nsfw_model``, ...). :data:`MODEL_PARAMS` lists, per operator, that parameter and the kind of
folder it needs; sdtune's own operators add themselves with :func:`register_model_param` when they are
imported. :func:`check_recipe_models` runs inside ``validate_recipe``, so a missing or broken model is
a :class:`PipelineError` naming the op, the key, the value and the fix before the pre-checks open a
single image (data-juicer itself would only fail on the first sample, after the cheap filters ran).

* A local folder must hold what its kind needs (``transformers``: a ``config.json`` that
  transformers parses, weights, and a processor that ``AutoProcessor`` loads, as data-juicer does;
  ``wd14``: ``model.onnx`` and ``selected_tags.csv``; ``aesthetics``: the predictor's files, and no
  pickle-only weights unless the op's ``allow_pickle`` is true).
* A Hugging Face Hub id (``org/name``, not on disk) must be fetchable now: its ``config.json`` (a
  tagger's ``selected_tags.csv`` and ``model.onnx``) is fetched (from the local cache when there) so that an offline machine or a typo fails here.

sdtune's model operators (:data:`IN_PROCESS_OPS`) run in the stage's own process
(:class:`InStageProcess`): datasets would map them in a pool of ``np`` workers (one worker even for
``num_proc=1``), and data-juicer switches the start method to forkserver/spawn for every op that uses
CUDA, where such a worker dies (``AuthenticationError: digest sent was rejected``: a multiprocessing
manager proxy unpickled in a ``multiprocess`` worker). In-process the model loads once and the
captioning bar counts for real. They also fail loudly: ``skip_op_error`` defaults to false for them
(:func:`data_pipeline.recipe.build_config`), so an error inside a batch reaches the user as itself
instead of silently dropping the batch.

The stage also never installs packages at run time: data-juicer's ``LazyLoader`` would ``pip install``
a missing dependency of an operator (simple-aesthetics-predictor, for one, pins transformers < 5 and
would break this install). :func:`forbid_runtime_installs` turns that into an ``ImportError`` that
names the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline.errors import PipelineError
from data_pipeline.reasons import effective_params
from sdtune.utils.errors import ModelLoadError

TRANSFORMERS = "transformers"
WD14 = "wd14"
AESTHETICS = "aesthetics"
KINDS = {
    TRANSFORMERS: "a transformers model folder (config.json, .safetensors weights and the processor's files such as "
    "preprocessor_config.json and the tokenizer's, as the model's and its processor's save_pretrained write them)",
    WD14: "a WD14 tagger folder (model.onnx and selected_tags.csv, as SmilingWolf's taggers ship)",
    AESTHETICS: "a local LAION aesthetic predictor folder (simple-aesthetics-predictor's layout, e.g. "
    "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE downloaded)",
}

#: data-juicer ops that cannot work in this stage -> why, and what to use instead.
REFUSED_OPS: dict[str, str] = {
    "image_aesthetics_filter": "it needs the simple-aesthetics-predictor package, which pins transformers < 5 and "
    "torchvision and so cannot be installed next to sdtune. Fix: use sdtune_aesthetics_filter (the same LAION "
    "predictor and folders; param model, min_score/max_score on the 0-10 scale)",
    "image_text_matching_filter": "it scores only caption chunks holding the <__dj__image> token, which sdtune's "
    "captions never hold, so it would keep every image unscored. Fix: use sdtune_image_text_matching_filter (the "
    "same BLIP model and params, the whole caption against the image)",
    "image_captioning_mapper": "it captions only images whose caption holds the <__dj__image> token (sdtune's never "
    "do), samples instead of decoding deterministically, and adds new samples rather than writing the caption, so "
    "no caption would reach OUT. Fix: use sdtune_image_captioner (param model; or make data CAPTION=<model>)",
    "mllm_mapper": "it replaces the caption with a list of replies that repeat the chat prompt, which would be "
    "written to OUT as the caption. Fix: use sdtune_image_captioner (param model, prompt: the instruction; or "
    "make data CAPTION=<model> CAPTION_PROMPT=<instruction>)",
}

#: op name -> (parameter holding the model, folder kind): data-juicer's model ops that run here as they are;
#: sdtune's own ops add theirs with :func:`register_model_param`.
MODEL_PARAMS: dict[str, tuple[str, str]] = {
    "image_nsfw_filter": ("hf_nsfw_model", TRANSFORMERS),
    "image_watermark_filter": ("hf_watermark_model", TRANSFORMERS),
}

#: sdtune's model ops: run in the stage's process (:class:`InStageProcess`), ``skip_op_error`` false by default.
IN_PROCESS_OPS = frozenset({
    "sdtune_image_captioner", "sdtune_image_tagger", "sdtune_aesthetics_filter", "sdtune_image_text_matching_filter",
    "image_nsfw_filter", "image_watermark_filter",
})  # fmt: skip


class InStageProcess:
    """Mixin (first base) for an op in :data:`IN_PROCESS_OPS`: no worker pool, whatever ``np`` is."""

    def runtime_np(self):
        return None  # datasets then maps in this process: the model loads once, here, on any start method


def register_model_param(op_name: str, param: str, kind: str = TRANSFORMERS) -> None:
    """Declare that ``op_name`` loads the model named by its ``param`` (called by sdtune's ops)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {sorted(KINDS)}")
    MODEL_PARAMS[op_name] = (param, kind)


def _local_problem(folder: Path, kind: str, trust_remote_code: bool = False) -> str | None:
    """What is wrong with a local model folder of ``kind``, or None."""
    if not folder.is_dir():
        return "is a file, not a model folder"
    if kind == AESTHETICS:
        from sdtune.evaluation.aesthetic_folders import predictor_problem  # deferred: safetensors, only for this kind

        return predictor_problem(folder)[1]
    if kind == WD14:
        missing = [n for n in ("model.onnx", "selected_tags.csv") if not (folder / n).is_file()]
        return f"has no {' and no '.join(missing)}" if missing else None
    config = folder / "config.json"
    if not config.is_file():
        return "has no config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return f"has a config.json that is not valid JSON ({err})"
    from transformers import AutoConfig  # deferred: transformers (seconds), only when a recipe names a model

    try:
        # an explicit bool: None would ask "run the custom code? [y/N]" on a terminal
        AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        hint = "" if trust_remote_code or "custom code" not in str(err) else (
            "; it needs its own code: set trust_remote_code: true on the op if you trust it")
        return f"has a config.json transformers cannot read ({type(err).__name__}: {str(err).splitlines()[0]}){hint}"
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".safetensors.index.json")]
    if not weights:
        return "has no weights (*.safetensors or *.bin)"
    from transformers import AutoProcessor  # deferred: as above

    try:  # what data-juicer's prepare_model loads next to the model; a failure mid-run would be garbled
        AutoProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as err:  # processors raise OSError, ValueError, TypeError, ...: all mean "cannot load"
        first = (str(err).strip().split(". ")[0] or type(err).__name__)[:300]
        return f"has no processor transformers can load (AutoProcessor: {type(err).__name__}: {first})"
    return None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") != 1 or os.sep != "/" and os.sep in value


def _hub_problem(repo: str, kind: str) -> str | None:
    """Fetch the hub repo's small index file now (cache first) so that a typo or no network fails here."""
    from huggingface_hub import hf_hub_download  # deferred: only for a Hub id

    for filename in ("selected_tags.csv", "model.onnx") if kind == WD14 else ("config.json",):
        try:
            hf_hub_download(repo, filename)
        except Exception as err:  # offline, unknown repo, gated repo: all mean "cannot load it"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"is not a local folder, and the Hugging Face Hub did not give its {filename} ({first[:200]})"
    return None


def _pickle_gate(op_name: str, value: str, where: str, allow_pickle: bool) -> None:
    """The project's loading gate (:func:`sdtune.families.source.check_weights`) for a folder the op
    loads with ``allow_pickle`` (its recipe parameter; ``model.allow_pickle`` is training's, not the stage's)."""
    from sdtune.families.source import check_weights  # deferred: sdtune.families (torch), only for a model op

    try:
        check_weights(value, key=where, allow_pickle=allow_pickle)
    except ModelLoadError as err:
        what = str(err).split("; loading one can run arbitrary code")[0]
        raise PipelineError(
            f"recipe {what}; loading a pickle can run arbitrary code. Fix: set `allow_pickle: true` on {op_name} in "
            "the recipe if you trust the file, or convert the weights to safetensors (load the folder with "
            "transformers and save_pretrained it again; published predictor folders may hold only pytorch_model.bin)."
        ) from None


def check_model(op_name: str, param: str, value, kind: str, recipe_path, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> None:
    """Refuse a model value that cannot load; the message names the recipe, op, key, value and fix."""
    where = f"recipe {recipe_path}: {op_name}.{param}"
    if not isinstance(value, str) or not value.strip():
        raise PipelineError(f"{where} is {value!r}; it must name a model: {KINDS[kind]}, or a Hugging Face Hub id.")
    local = Path(value).expanduser()
    if local.is_dir() and kind == AESTHETICS:
        _pickle_gate(op_name, value, f"{recipe_path}: {op_name}.{param}", bool(allow_pickle))
    if local.exists():
        problem = _local_problem(local, kind, trust_remote_code)
    elif _looks_like_path(value):
        problem = "does not exist"
    elif kind == AESTHETICS:
        problem = "is not a local folder (the aesthetic predictor loads from disk only)"
    else:
        problem = _hub_problem(value, kind)
    if problem:
        raise PipelineError(
            f"{where}={value!r} {problem}. Fix: give {KINDS[kind]}; a Hub model can be downloaded first with "
            f"`huggingface-cli download <id> --local-dir <folder>` and the folder named instead."
        )


def check_recipe_models(ops: list[tuple[str, dict]], recipe_path) -> None:
    """:func:`check_model` for every op in ``ops`` (``[(name, params)]``) that loads a model."""
    for n, (name, params) in enumerate(ops, 1):
        if name in REFUSED_OPS:
            raise PipelineError(f"recipe {recipe_path}: process entry {n} is data-juicer's {name}, which this stage "
                                f"refuses: {REFUSED_OPS[name]}.")
        if name not in MODEL_PARAMS:
            continue
        param, kind = MODEL_PARAMS[name]
        values = effective_params(name, params)
        check_model(name, param, values.get(param), kind, recipe_path, allow_pickle=values.get("allow_pickle") is True,
                    trust_remote_code=values.get("trust_remote_code") is True)


def forbid_runtime_installs() -> None:
    """Make data-juicer's LazyLoader raise ImportError instead of running ``pip install``."""
    from data_juicer.utils.lazy_loader import LazyLoader  # deferred: data-juicer (seconds), as in dj.py

    def _refuse(cls, package_spec, pip_args=None):
        raise ImportError(
            f"data-juicer asked to install {package_spec!r}; the data stage never installs packages while it runs "
            "(the install is requirements.lock). Fix: use an operator whose dependencies are installed, or install "
            f"{package_spec!r} yourself if it fits the lock."
        )

    LazyLoader._install_package = classmethod(_refuse)
