"""The one interface every model family implements.

The LightningModule, the exporter and the sampler talk to a family only through this interface,
so SD1.5, SDXL and Kolors differences (text encoders, extra UNet conditioning, pipeline class)
stay inside their own module and never become ``if family == ...`` branches elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtune.families.kohya import STANDARD_XL_UNET, KohyaModule, PerModuleNames
from sdtune.families.objectives import DDPMObjective, Objective
from sdtune.families.quantize_load import dequantize_in_matmul, load_kwargs, quantize_parts
from sdtune.utils.errors import ConfigError, ModelLoadError

#: What a pipeline is asked to do: draw from noise, or redraw an input picture (SDEdit).
TASKS = ("text2img", "img2img")


@dataclass
class ModelParts:
    """The loaded pieces of a base model. Only the denoiser (a UNet or a transformer) and, when
    asked, the text encoders get LoRA layers."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under its old name, read-only, while call sites move to :attr:`denoiser`."""
        return self.denoiser


class ModelFamily(ABC):
    """What the trainer needs to know about one family of Stable Diffusion models."""

    name: ClassVar[str]
    #: The denoiser's diffusers subfolder, which is also its attribute on pipelines and on the
    #: training module (so the checkpoint key prefix) and diffusers' LoRA key prefix.
    denoiser_subfolder: ClassVar[str] = "unet"
    #: diffusers class name of the denoiser.
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    #: diffusers class name of the scheduler the training objective noises with.
    training_scheduler: ClassVar[str] = "DDPMScheduler"
    #: The training objective's class (its ``check_config`` runs before anything loads).
    objective_class: ClassVar[type[Objective]] = DDPMObjective
    #: diffusers class name of this family's ControlNets.
    controlnet_class: ClassVar[str] = "ControlNetModel"
    #: The text2img ControlNet pipeline's argument for the control picture (SD's ``image``; SD3's and
    #: FLUX's ``control_image``); the img2img ones all take ``control_image`` beside ``image``.
    controlnet_image_argument: ClassVar[str] = "image"
    #: Image sides (``data.resolution``, ``data.bucket_step``) are multiples of this many pixels,
    #: for :attr:`pixel_multiple_reason`. A diffusers UNet takes any latent size (it upsamples to
    #: its skip connections' sizes), so the UNet families need only the VAE's 8; a transformer that
    #: cuts latents into 2x2 patches needs 16.
    pixel_multiple: ClassVar[int] = 8
    pixel_multiple_reason: ClassVar[str] = "the VAE downsamples by 8"
    # Declared for the flow-matching families (issue 27); the LoRA export and the text-encoder LoRA
    # read them as those families arrive.
    #: The layout of the run's LoRA file by default (``callbacks.lora_export.format``).
    default_export_format: ClassVar[str] = "kohya"
    #: Indices of the text encoders that can get LoRA layers (None: all of them).
    lora_text_encoders: ClassVar[tuple[int, ...] | None] = None
    #: Why the other text encoders take no LoRA layers (said when ``lora.text_encoder.targets`` name their layers).
    frozen_text_encoder_reason: ClassVar[str] = ""
    #: torch dtype name generate draws in on a GPU.
    inference_dtype: ClassVar[str] = "float16"
    #: Why ``sdtune.morph`` cannot work on this family ("": it can).
    morph_refusal: ClassVar[str] = ""
    #: ``speed.*`` settings refused for this family's denoiser, as written on the command line
    #: (``"speed.channels_last=true"``), each with its reason and fix; checked before anything loads.
    speed_refusals: ClassVar[dict[str, str]] = {}
    #: Square training resolution the family was trained at.
    default_resolution: ClassVar[int]
    #: Classifier-free guidance scale the family's pipelines draw best at (its model card's default);
    #: ``model.guidance`` overrides it for one base (the toy bases want 2).
    default_guidance: ClassVar[float]
    #: UNet module names that get LoRA layers when ``lora.targets`` is left at ``default``.
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    #: Text-encoder modules that get LoRA layers with ``lora.text_encoder.targets: null`` (CLIP: the
    #: attention projections, kohya's and diffusers' training scripts' choice).
    default_text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    #: The kind of each text encoder, in order: "clip" (LoRA files name its layers under ``text_model.``),
    #: "chatglm" or "t5".
    text_encoder_kinds: ClassVar[tuple[str, ...]] = ("clip",)
    #: Version string written to LoRA headers (``ss_base_model_version`` in kohya's tools).
    base_model_version: ClassVar[str]
    #: The diffusers layout holds alpha in its tensors: with alpha != rank, alpha/rank is folded into
    #: ``lora_B`` and the header's ``lora_alpha`` is the rank (ComfyUI reads that layout and applies
    #: no header alpha; the true alpha is kept as ``sdtune.alpha``).
    bake_diffusers_alpha: ClassVar[bool] = False

    #: diffusers pipeline class names per (task, with a ControlNet); None where diffusers has none,
    #: which :meth:`pipeline_class` refuses with a clear error. Every class takes the keyword
    #: arguments of :meth:`pipeline_components` (plus ``controlnet=`` for the ControlNet ones).
    pipelines: ClassVar[dict[tuple[str, bool], str | None]]
    #: diffusers pipeline class that reads this family's single-file checkpoints (None: folders only).
    single_file_pipeline: ClassVar[str | None] = None
    #: Text encoders in single-file checkpoints: (key prefix, naming), one per encoder in order;
    #: naming is "clip" (transformers' names) or "openclip" (SDXL's second encoder). Empty: the
    #: family has no single-file layout (merge writes the diffusers folder only).
    single_file_text_encoders: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Text-encoder subfolders of a diffusers folder, in the order ``encode_prompts`` uses them.
    text_encoder_subfolders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: kohya names use the original SGM UNet paths (``input_blocks.4.1...``) rather than
    #: diffusers' (``down_blocks.1.attentions.0...``): what kohya sd-scripts writes for SDXL.
    kohya_sgm_names: ClassVar[bool] = False
    #: Keys of a textual-inversion embedding file, one per text encoder in order (A1111/ComfyUI
    #: names); empty: the family cannot train embeddings, for :attr:`embedding_refusal`'s reason.
    embedding_keys: ClassVar[tuple[str, ...]] = ()
    embedding_refusal: ClassVar[str] = ""

    def load(
        self,
        path: str,
        *,
        dtype: torch.dtype = torch.float32,
        vae_path: str | None = None,
        revision: str | None = None,
        config: str | None = None,
        quantize: Mapping[str, str | None] | None = None,
    ) -> ModelParts:
        """Load the parts from a diffusers folder, a hub id or (SD1.5, SDXL, FLUX.1) a single file.

        ``config`` names a diffusers folder or hub id whose configs describe a single-file
        checkpoint; diffusers guesses one from the hub when it is left out. ``quantize`` is
        :func:`sdtune.families.quantize.choice`'s {"denoiser": mode, "text_encoder": mode} (None:
        nothing quantized): those parts load quantized (:mod:`sdtune.families.quantize_load`).
        """
        import diffusers
        from diffusers import AutoencoderKL

        quantize = dict(quantize or {})
        if Path(path).is_file():
            parts = self._load_single_file(path, config=config, dtype=dtype, vae_path=vae_path)
            quantize_parts(self, parts, quantize, dtype)  # diffusers' single-file loader would not
            return parts
        vae = self._load_vae(vae_path, dtype) if vae_path else None
        try:
            tokenizers, text_encoders = self.load_text_parts(path, dtype=dtype, revision=revision,
                                                             quantize=quantize.get("text_encoder"))
            if vae is None:
                vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, torch_dtype=dtype)
            denoiser = getattr(diffusers, self.denoiser_class).from_pretrained(
                path, subfolder=self.denoiser_subfolder, revision=revision, torch_dtype=dtype,
                **load_kwargs(quantize.get("denoiser"), dtype))
            scheduler = getattr(diffusers, self.training_scheduler).from_pretrained(
                path, subfolder="scheduler", revision=revision)
        except (OSError, ValueError) as err:
            raise self._load_error(path, err) from err
        for module in (denoiser, *text_encoders):  # no full-precision weight copies kept for the backward
            dequantize_in_matmul(module)
        return ModelParts(
            denoiser=denoiser, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers, noise_scheduler=scheduler,
            source=path,
        )

    def configure_parts(self, parts: ModelParts, model_cfg: Mapping[str, Any]) -> None:
        """Record family-specific ``model.*`` settings on loaded ``parts`` (in ``parts.extra``); called by
        :func:`sdtune.families.builder.build_parts` after :meth:`load`. Nothing by default."""
        return None

    @abstractmethod
    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None,
                        quantize: str | None = None) -> tuple[list[Any], list[torch.nn.Module]]:
        """(tokenizers, text encoders) from a diffusers folder or hub id; the large encoders
        (:func:`~sdtune.families.quantize.quantized_text_encoders`) quantized in ``quantize``'s mode
        (``quantize_load.text_encoder_kwargs``)."""

    def text_max_length(self, parts: ModelParts) -> int:
        """Prompt length in tokens; longer captions are truncated (and the cache key includes it)."""
        return parts.tokenizers[0].model_max_length

    def overlong_captions(self, parts: ModelParts, captions: list[str]) -> list[str]:
        """Captions longer than the encoder's token limit (they will be truncated)."""
        tokenizer, limit = parts.tokenizers[0], self.text_max_length(parts)
        return [c for c in captions if len(tokenizer(c, truncation=False)["input_ids"]) > limit]

    @abstractmethod
    def tokenize(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        """What the text encoders take for ``captions`` (token ids, ...), on the CPU, batch-first.

        Each row depends on its caption only (padded to the fixed maximum length), so the trainer may
        tokenize a caption once and stack cached rows (:class:`sdtune.data.text_cache.TokenCache`).
        """

    @abstractmethod
    def encode_tokens(self, parts: ModelParts, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Text-encoder outputs for :meth:`tokenize`'s ``tokens``, batch-first."""

    def encode_prompts(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text-encoder outputs for ``captions``, batch-first; each row depends on its caption only.

        Rows are independent, so the trainer may compute them once per caption and cache them.
        """
        return self.encode_tokens(parts, self.tokenize(parts, captions))

    @abstractmethod
    def conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """The conditioning :meth:`predict` takes, built from encoded text and the batch (for a
        UNet: the keyword arguments of ``unet(noisy, t, **kwargs)``)."""

    def unet_conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """:meth:`conditioning` under its old name, while call sites move."""
        return self.conditioning(text, batch)

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:
        """The denoiser's prediction (B, C, h, w) for ``noisy`` latents at the model's ``timesteps``
        (:meth:`Objective.model_timestep`) under :meth:`conditioning`'s ``cond``."""
        return denoiser(noisy, timesteps, **cond, return_dict=False)[0]

    def objective(self, parts: ModelParts, train_cfg: Mapping[str, Any]) -> Objective:
        """The training objective over ``parts``' training scheduler, set up from ``train:``.
        Building it draws no random numbers."""
        return DDPMObjective(parts.noise_scheduler, snr_gamma=train_cfg.get("snr_gamma"),
                             prediction_type=train_cfg.get("prediction_type"))

    def enable_sdpa(self, denoiser: torch.nn.Module) -> None:
        """Run the denoiser's attention through PyTorch's fused scaled-dot-product attention."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        denoiser.set_attn_processor(AttnProcessor2_0())

    def pipeline_call_kwargs(self, guidance: float, lora_scale: float | None = None,
                             parts: ModelParts | None = None) -> dict[str, Any]:
        """The pipeline call's keyword arguments for a guidance scale and (not None) the LoRA's scale."""
        extra: dict[str, Any] = {"guidance_scale": float(guidance)}
        if lora_scale is not None:
            extra["cross_attention_kwargs"] = {"scale": float(lora_scale)}
        return extra

    def kohya_modules(self, denoiser_config: Mapping[str, Any] | None = None) -> Mapping[str, KohyaModule]:
        """diffusers module path -> the kohya module it is written to (``lora_unet_`` + its name),
        for a denoiser of ``denoiser_config`` (None: the family's standard layout). Default: each
        module its own, under its SGM path when :attr:`kohya_sgm_names`."""
        return PerModuleNames((denoiser_config or STANDARD_XL_UNET) if self.kohya_sgm_names else None)

    def lora_base_model_version(self, denoiser_config: Mapping[str, Any] | None = None) -> str:
        """``ss_base_model_version`` of a LoRA for a denoiser of ``denoiser_config`` (None: unknown)."""
        return self.base_model_version

    def lora_architecture(self, denoiser_config: Mapping[str, Any] | None = None) -> str | None:
        """``modelspec.architecture`` of such a LoRA (kohya's ``sai_model_spec`` strings); None: not written."""
        return None

    def controlnet_fits(self, denoiser_config: Mapping[str, Any], controlnet_config: Mapping[str, Any]) -> list[str]:
        """The config keys in which a ControlNet does not fit this base's denoiser ([]: it fits)."""
        keys = ("cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim")
        return [k for k in keys if controlnet_config.get(k) != denoiser_config.get(k)]

    @abstractmethod
    def pipeline_components(self, parts: ModelParts) -> dict[str, Any]:
        """Constructor keyword arguments every pipeline of this family takes: the modules of
        ``parts`` (shared, not copied), the sampling scheduler and the family's pipeline flags."""

    def pipeline_class(self, task: str = "text2img", *, controlnet: bool = False) -> type:
        """The diffusers pipeline class for ``task`` (``text2img`` or ``img2img``), with or without a
        ControlNet; a :class:`ConfigError` naming the fix where diffusers has none for this family."""
        import diffusers

        if task not in TASKS:
            raise ValueError(f"pipeline task must be one of {TASKS}, got {task!r}")
        name = self.pipelines.get((task, controlnet))
        if name is None:
            able = sorted(n for n, cls in FAMILIES.items() if cls.pipelines.get((task, controlnet)))
            what = f"{task} with a ControlNet" if controlnet else task
            drop = "drop controlnet.path (plain img2img with init_image, or text2img)" if controlnet else "drop init_image"
            raise ConfigError(
                f"model.family={self.name} has no diffusers pipeline for {what} (diffusers {diffusers.__version__} "
                f"ships none for {self.name}). Fix: {drop}, or use a base of a family that has one: {able}."
            )
        return getattr(diffusers, name)

    def build_pipeline(self, parts: ModelParts, *, task: str = "text2img", controlnet: torch.nn.Module | None = None):
        """A diffusers inference pipeline over ``parts`` (sharing, not copying, the modules) for
        ``task``; with ``controlnet`` (a ``ControlNetModel``) the family's ControlNet pipeline."""
        cls = self.pipeline_class(task, controlnet=controlnet is not None)
        extra = {} if controlnet is None else {"controlnet": controlnet}
        return cls(**self.pipeline_components(parts), **extra)

    @abstractmethod
    def build_tiny(self, folder: Path) -> None:
        """Save a random-initialised miniature of this family (real classes, toy sizes, seeded) to ``folder``."""

    def build_toy_folder(self, folder: Path) -> None:
        """Save the random-initialised architecture of this family's pretrained toy base
        (:mod:`sdtune.toy`) to ``folder``: by default :meth:`build_tiny`'s."""
        self.build_tiny(folder)

    @abstractmethod
    def random_text_parts(self, arch: Mapping[str, Any], *, meta: bool) -> tuple[list[Any], list[torch.nn.Module]]:
        """(tokenizers, text encoders) with random weights from ``arch``'s encoder configs
        (``arch[subfolder]`` for each of :attr:`text_encoder_subfolders`); no tokenizers when ``meta``."""

    @abstractmethod
    def text_shapes(self, arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of what :meth:`encode_prompts` returns, read off ``arch``'s encoder configs."""

    def text_encoders_with_lora(self) -> tuple[int, ...]:
        """Indices of the text encoders ``lora.text_encoder`` adapts: :attr:`lora_text_encoders`, else all."""
        if self.lora_text_encoders is not None:
            return tuple(self.lora_text_encoders)
        return tuple(range(len(self.text_encoder_kinds)))

    def guidance(self, model_cfg: Mapping[str, Any] | None = None) -> float:
        """The guidance scale to sample ``model_cfg``'s base at: its ``guidance``, else the family's."""
        value = (model_cfg or {}).get("guidance")
        return float(value) if value is not None else float(self.default_guidance)

    # -- shared helpers -------------------------------------------------------------------
    def _load_vae(self, vae_path: str, dtype: torch.dtype):
        from diffusers import AutoencoderKL

        try:
            return AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"Could not load the VAE from model.vae_path={vae_path!r}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}\nFix: point model.vae_path at a diffusers "
                "AutoencoderKL folder or hub id (the one holding config.json), or set model.vae_path=null."
            ) from err

    def _load_single_file(self, path: str, *, config: str | None, dtype: torch.dtype, vae_path: str | None) -> ModelParts:
        """Parts of an A1111/ComfyUI-style single ``.safetensors`` file, via diffusers' reader."""
        import diffusers

        if self.single_file_pipeline is None:
            raise ModelLoadError(
                f"model.path={path!r} is a single file, but {self.name} models are only published as diffusers "
                "folders. Fix: point model.path at the diffusers folder (the one with model_index.json)."
            )
        pipeline_cls = getattr(diffusers, self.single_file_pipeline)
        try:
            pipe = pipeline_cls.from_single_file(path, config=config, torch_dtype=dtype, local_files_only=bool(config))
            vae = pipe.vae
        except Exception as err:  # diffusers raises several types for unreadable or unknown files
            hint = "" if config else (
                " A single file needs its architecture's configs: set model.config to a diffusers folder (or hub id) "
                "of the same architecture."
            )
            raise ModelLoadError(
                f"Could not load the {self.name} single-file checkpoint model.path={path!r}: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}.{hint}"
            ) from err
        if vae_path:
            vae = self._load_vae(vae_path, dtype)
        subfolders = self.text_encoder_subfolders
        encoders = [m for m in (getattr(pipe, sub, None) for sub in subfolders) if m is not None]
        tokenizers = [t for t in (getattr(pipe, sub.replace("text_encoder", "tokenizer"), None) for sub in subfolders)
                      if t is not None]
        return ModelParts(
            denoiser=getattr(pipe, self.denoiser_subfolder),
            vae=vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            noise_scheduler=getattr(diffusers, self.training_scheduler).from_config(pipe.scheduler.config),
            source=path,
        )

    def _load_error(self, path: str, err: Exception) -> ModelLoadError:
        return ModelLoadError(
            f"Could not load the {self.name} base model from model.path={path!r}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            "Fix: set model.path to a local diffusers folder (the one holding model_index.json) or a "
            "hub id you can download, or run `python -m sdtune experiment=quickstart` to try sdtune "
            "on a tiny built-in model."
        )


#: The registry, family name -> class: :func:`sdtune.families.get_family` is the only lookup by name.
#: It lives beside the interface (``sdtune.families`` fills it with the built-in families) so that
#: the interface can ask about every family (which ones have a pipeline for a task) without
#: importing the family modules, which import this one.
FAMILIES: dict[str, type[ModelFamily]] = {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Make ``cls`` available as ``model.family=<cls.name>`` (usable as a class decorator)."""
    if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
        raise ValueError(f"a model family named {cls.name!r} is already registered ({FAMILIES[cls.name].__qualname__})")
    FAMILIES[cls.name] = cls
    return cls
