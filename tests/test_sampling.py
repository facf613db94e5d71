"""Sample rendering and the labelled grid."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sdtune.families import get_family
from sdtune.lora import LoraSpec, inject, trainable_lora_parameters
from sdtune.sampling import make_grid, render


def test_grid_layout_places_every_tile():
    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]
    rows = [[Image.new("RGB", (16, 16), c) for c in row] for row in colours]
    grid = make_grid(rows, ["off", "on"], ["p1", "p2"], min_tile=32)
    assert grid.size == (120 + 2 * 36, 34 + 2 * 36)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            centre = (120 + c * 36 + 16, 34 + r * 36 + 16)
            assert grid.getpixel(centre) == colour
    # labels are drawn (dark pixels in the header and the label column)
    header = np.asarray(grid.crop((120, 0, grid.width, 34)))
    assert (header < 100).any()


def test_render_is_seeded_and_lora_scale_zero_is_the_base(tiny_sd15):
    family = get_family("sd15")
    parts = family.load(str(tiny_sd15))
    pipe = family.build_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(steps=3, guidance=2.0, size=64)
    base = render(pipe, ["a red circle"], [7], **kw)[0]
    again = render(pipe, ["a red circle"], [7], **kw)[0]
    assert np.array_equal(np.asarray(base), np.asarray(again))
    inject(parts.unet, LoraSpec(rank=2, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0")))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.unet):
            p.normal_(std=0.5)
    off = render(pipe, ["a red circle"], [7], lora_scale=0.0, **kw)[0]
    on = render(pipe, ["a red circle"], [7], lora_scale=1.0, **kw)[0]
    assert np.array_equal(np.asarray(off), np.asarray(base))
    assert np.abs(np.asarray(on, dtype=int) - np.asarray(off, dtype=int)).mean() > 1
