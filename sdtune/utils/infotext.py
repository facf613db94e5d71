"""A1111's ``parameters`` text: what each image sdtune draws carries in its PNG (generate, morph).

A1111, Forge and ComfyUI read it back (prompt, negative prompt, then one settings line); model sites
show it. Built from a ``generation.json`` record alone, so both commands that draw write the same
text without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def infotext(record: dict, seed: int, *, loras_on: bool = True) -> str:
    """A1111's ``parameters`` text for one image: prompt (with ``<lora:name:weight>`` tags, as A1111
    writes and reads them), negative prompt, then the settings line."""
    loras = record["loras"] if loras_on else []
    prompt = " ".join([str(record["prompt"]), *(f"<lora:{Path(lo['path']).stem}:{lo['weight']:g}>" for lo in loras)])
    lines = [prompt]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    width, height = record["size"]
    settings = [f"Steps: {record['steps']}", f"Sampler: {record['sampler']}", f"CFG scale: {record['guidance']:g}",
                f"Seed: {seed}", f"Size: {width}x{height}", f"Model: {Path(str(record['model']['path'])).name}",
                *infotext_fields(record)]
    if loras:
        hashes = ", ".join(f"{Path(lo['path']).stem}: {lo['tensor_sha256'][:12]}" for lo in loras)
        settings.append(f'Lora hashes: "{hashes}"')
    lines.append(", ".join([*settings, "Version: sdtune"]))
    return "\n".join(lines)


def infotext_fields(record: dict[str, Any]) -> list[str]:
    """A1111's settings-line fields for ``record``'s image inputs: ``Denoising strength`` (A1111's
    img2img name), ``ControlNet 0`` (sd-webui-controlnet's quoted unit), and the input's path and hash."""
    fields = []
    if record.get("init_image"):
        fields += [f"Denoising strength: {record['strength']:g}", f"Init image: {json.dumps(record['init_image']['path'])}",
                   f"Init image hash: {record['init_image']['sha256'][:12]}"]
    cn = record.get("controlnet")
    if cn:
        unit = [f"Module: {cn['preprocess']}", f"Model: {Path(str(cn['path'])).name}", f"Weight: {cn['conditioning_scale']:g}"]
        if cn["preprocess"] == "canny":
            unit += [f"Threshold A: {cn['low_threshold']}", f"Threshold B: {cn['high_threshold']}"]
        fields.append(f"ControlNet 0: {json.dumps(', '.join(unit))}")
    return fields
