"""Flow-matching families registered by a test, for the config checks (nothing of theirs loads).

:class:`ConfigFlow` is a :class:`~sdtune.families.flow.FlowFamily` (its objective, pixel multiple,
speed refusals and transformer subfolder) with SD1.5's text side borrowed so that the class is
complete; the settings checks never build more than its denoiser, on the meta device.
:func:`flow_folder` writes the component configs of a diffusers folder whose transformer is a
published full-size one, for the hardware weight check.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdtune.families import FAMILIES, register_family
from sdtune.families.arch import CONFIGS
from sdtune.families.flow import FlowFamily
from sdtune.families.sd15 import SD15

#: Published transformer configs (FLUX.1-dev, SD3.5 Large and Medium), as in /work/briefs/issue27_check_meta.py.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=[],
                  qk_norm="rms_norm")
SD35_MEDIUM = dict(SD35_LARGE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=384, dual_attention_layers=list(range(13)))
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


class ConfigFlow(FlowFamily, SD15):
    """A flow-matching family with an SD3 transformer, for the settings checks."""

    name = "config_flow"
    denoiser_class = "SD3Transformer2DModel"


class ConfigFlux(ConfigFlow):
    """The same with FLUX's transformer."""

    name = "config_flux"
    denoiser_class = "FluxTransformer2DModel"


@contextlib.contextmanager
def registered(*families: type) -> Iterator[None]:
    """``families`` registered for the block, and removed after it."""
    for family in families:
        register_family(family)
    try:
        yield
    finally:
        for family in families:
            FAMILIES.pop(family.name, None)


def flow_folder(root: Path, transformer: dict[str, Any], scheduler: dict[str, Any] | None = None) -> Path:
    """A diffusers folder of configs only: ``transformer`` plus SD1.5's shipped VAE and text encoder."""
    for sub, file, config in (("transformer", "config.json", transformer),
                              ("vae", "config.json", json.loads((CONFIGS / "sd15_vae.json").read_text())),
                              ("text_encoder", "config.json", json.loads((CONFIGS / "sd15_text_encoder.json").read_text())),
                              ("scheduler", "scheduler_config.json", scheduler or {"shift": 3.0})):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / file).write_text(json.dumps(config))
    return root
