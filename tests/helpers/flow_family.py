"""Flow-matching families registered by a test, for the config checks (nothing of theirs loads).

:class:`ConfigFlow` is a :class:`~sdtune.families.flow.FlowFamily` (its objective, pixel multiple,
speed refusals and transformer subfolder) with SD1.5's text side borrowed so that the class is
complete; the settings checks never build more than its denoiser, on the meta device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sdtune.families import FAMILIES, register_family
from sdtune.families.flow import FlowFamily
from sdtune.families.sd15 import SD15

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
