"""The ``data:`` section's checks, and those of the training methods that change what a batch
holds (masked loss, DreamBooth prior preservation), before any image is read.

The section's rules in one place, apart from the dataset code that follows them; the cache checks
live beside the caches (:mod:`sdtune.data.cache_memory`, :mod:`sdtune.data.latents`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from sdtune.config.values import Settings, integer
from sdtune.data.cache_memory import check_config as check_cache_memory
from sdtune.data.latents import check_cacheable
from sdtune.families import get_family
from sdtune.utils.errors import ConfigError

#: What data.bad_images takes: stop at the first bad image, or skip it with a warning.
BAD_IMAGES = ("error", "skip")


def check_config(cfg: DictConfig) -> None:
    """``data.*``: the root is set, the image sizes are multiples of the family's
    :attr:`~sdtune.families.base.ModelFamily.pixel_multiple`, the loader settings and the caches."""
    s = Settings(cfg)
    if s.get("data.root") in (None, ""):
        raise ConfigError(
            "data.root is not set. Fix: data.root=<folder with images and metadata.csv>, "
            "or try experiment=quickstart."
        )
    family = get_family(s.get("model.family"))
    multiple, why = family.pixel_multiple, f"{family.pixel_multiple_reason}, model.family={family.name}"
    res = s.integer("data.resolution", ge=multiple)
    if res % multiple:
        lower, upper = res - res % multiple, res - res % multiple + multiple
        raise ConfigError(f"data.resolution={res} is not divisible by {multiple} ({why}). Fix: use {lower} or {upper}.")
    s.choice("data.bad_images", BAD_IMAGES, said=" or ".join(BAD_IMAGES))
    s.boolean("data.allow_outside_root", optional=True)
    s.integer("data.batch_size", ge=1)
    if s.get("data.num_workers") != "auto":
        s.integer("data.num_workers", ge=0, fix="e.g. data.num_workers=4, or auto (4 at most on a GPU, 0 on the CPU).")
    s.choice("data.pin_memory", ("auto", True, False), said="true, false or auto (true on a CUDA GPU)")
    s.number("data.caption_dropout", ge=0, lt=1)
    s.integer("data.keep_tags", ge=0)
    step = s.integer("data.bucket_step", ge=multiple)
    if step % multiple:
        raise ConfigError(f"data.bucket_step={step} must be a multiple of {multiple} ({why}). "
                          f"Fix: data.bucket_step={max(multiple, step - step % multiple)}.")
    for folder, n in dict(s.get("data.repeats") or {}).items():
        integer(f"data.repeats.{folder}", n, ge=1, full=True)
    check_cache_memory(cfg)
    if s.get("data.cache_latents"):
        check_cacheable(bool(s.get("data.center_crop")))


def check_methods(cfg: DictConfig) -> None:
    """``train.masked_loss`` and DreamBooth prior preservation (``data.class_root`` or
    ``data.class_prompt``, ``train.prior_loss_weight``)."""
    s = Settings(cfg)
    s.boolean("train.masked_loss", optional=True)
    s.number("train.prior_loss_weight", ge=0)
    class_root, prompt = s.get("data.class_root"), s.get("data.class_prompt")
    if class_root and prompt:
        raise ConfigError(
            f"data.class_root={class_root!r} and data.class_prompt={prompt!r} are both set. Fix: give the class "
            "images (data.class_root) or a prompt to render them from (data.class_prompt), not both."
        )
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ConfigError(f"data.class_prompt must be a non-empty prompt such as 'a photo of a dog', got {prompt!r}.")
    if prompt:
        s.integer("data.num_class_images", ge=1, fix="e.g. data.num_class_images=100.")
        s.integer("data.class_sample_steps", ge=1, fix="e.g. data.class_sample_steps=30.")
    if (class_root or prompt) and s.get("data.cache_latents") and s.get("data.bucketing"):
        raise ConfigError(
            "prior preservation with data.cache_latents=true and data.bucketing=true is not supported: class "
            "images are cropped to each instance batch's bucket, which one cached crop cannot serve. Fix: turn "
            "one of data.cache_latents or data.bucketing off."
        )
