"""Which kohya module each diffusers denoiser module is written to: the data behind a family's
:meth:`~sdtune.families.base.ModelFamily.kohya_modules`.

kohya, ComfyUI and Forge name LoRA layers after the model's *original* state dict. For the UNet
families that is one module per diffusers module (SD1.x and Kolors under diffusers' own path, SDXL
under the SGM path). The flow transformers' originals (BFL's FLUX, SAI's MMDiT) fuse several
diffusers Linears into one weight: q, k and v are one ``qkv`` Linear, and a FLUX single block's
q, k, v and MLP input are one ``linear1``. A :class:`KohyaModule` says which diffusers modules
(its ``parts``, in row order, with their output ``dims``) make up one original module, and
whether the original stores the two halves of the output rows swapped (BFL/MMDiT's final
modulation is (shift, scale); diffusers' is (scale, shift)). The generic fusing maths is in
:mod:`sdtune.lora.keys`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sdtune.families.ldm_format import unet_block_prefixes

#: The standard SDXL UNet layout, used when the base model's own config is not at hand.
STANDARD_XL_UNET = {
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


@dataclass(frozen=True)
class KohyaModule:
    """One module of the original layout: its dotted path (``double_blocks.0.img_attn.qkv``; the
    file name is ``lora_unet_`` + the path with ``.`` -> ``_``), the diffusers modules it stacks
    (row order) with their output features, and whether its output halves are swapped."""

    name: str
    parts: tuple[str, ...]
    dims: tuple[int, ...] = ()  # output features of each part; needed when parts > 1
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


class PerModuleNames(Mapping[str, KohyaModule]):
    """The UNet families' rule as a table: every diffusers module path is its own kohya module,
    under its SGM path when ``sgm_config`` is given. It names any path asked for, so it is
    open-ended: it lists no entries (there are no fused modules to enumerate)."""

    def __init__(self, sgm_config: Mapping[str, Any] | None = None):
        self._prefixes = [(src, dst) for src, dst, _ in unet_block_prefixes(sgm_config)] if sgm_config else []

    def __getitem__(self, module: str) -> KohyaModule:
        path = next((dst + module[len(src):] for src, dst in self._prefixes if module.startswith(src)), module)
        return KohyaModule(path, (module,))

    def __contains__(self, module: object) -> bool:
        return isinstance(module, str)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class TableBuilder:
    """Collects a family's table: ``add(original path, diffusers parts, dims, swap)`` under
    block prefixes, so a key-table module reads as the table in its docs."""

    def __init__(self):
        self.table: dict[str, KohyaModule] = {}

    def add(self, name: str, parts: str | tuple[str, ...], dims: tuple[int, ...] = (), swap: bool = False) -> None:
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        module = KohyaModule(name, parts, dims if len(parts) > 1 else (), swap)
        for part in parts:
            self.table[part] = module

    def block(self, src: str, dst: str, rows: list[tuple[str, str | tuple[str, ...], tuple[int, ...]]]) -> None:
        """Rows ``(original suffix, diffusers suffix(es), dims)`` of one block ``src`` -> ``dst``."""
        for name, parts, dims in rows:
            parts = (parts,) if isinstance(parts, str) else parts
            self.add(f"{dst}.{name}", tuple(f"{src}.{p}" for p in parts), dims)
