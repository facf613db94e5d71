"""Sample rendering and the labelled grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.families import get_family
from sdtune.inference.sampling import make_grid, render
from sdtune.lora.layers import LoraSpec, inject, trainable_lora_parameters


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
    kw = dict(steps=3, size=64)
    base = render(pipe, ["a red circle"], [7], call_kwargs=family.pipeline_call_kwargs(2.0), **kw)[0]
    again = render(pipe, ["a red circle"], [7], call_kwargs=family.pipeline_call_kwargs(2.0), **kw)[0]
    assert np.array_equal(np.asarray(base), np.asarray(again))
    inject(parts.denoiser, LoraSpec(rank=2, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0")))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.denoiser):
            p.normal_(std=0.5)
    off = render(pipe, ["a red circle"], [7], call_kwargs=family.pipeline_call_kwargs(2.0, 0.0), **kw)[0]
    on = render(pipe, ["a red circle"], [7], call_kwargs=family.pipeline_call_kwargs(2.0, 1.0), **kw)[0]
    assert np.array_equal(np.asarray(off), np.asarray(base))
    assert np.abs(np.asarray(on, dtype=int) - np.asarray(off, dtype=int)).mean() > 1


def test_grid_labels_draw_chinese_glyphs_not_boxes():
    """Pillow's own font has no CJK glyphs (every character the same empty box); ours does."""
    from PIL import Image

    from sdtune.inference.sampling import has_cjk_font, make_grid

    assert has_cjk_font()
    tile = [[Image.new("RGB", (32, 32), "white")]]

    def label(text):
        return make_grid(tile, ["x"], [text]).crop((120, 0, 160, 30))

    dog, cat = label("狗"), label("猫")
    ink = [sum(1 for p in im.convert("L").getdata() if p < 128) for im in (dog, cat)]
    assert min(ink) > 5 and list(dog.getdata()) != list(cat.getdata())


def test_per_sample_prompts_seeds_negatives_and_a_wrapped_sheet():
    from PIL import Image

    from sdtune.evaluation.sample_grid import Sample, SampleGrid, parse_samples
    from sdtune.utils.errors import ConfigError

    samples = parse_samples(["a", {"prompt": "b", "seed": 7, "negative_prompt": "ugly"}, "c"], [0, 1], "blurry")
    assert samples == [Sample("a", 0, "blurry"), Sample("b", 7, "ugly"), Sample("c", 0, "blurry")]
    with pytest.raises(ConfigError, match=r"prompts\[0\] = .*each entry is a prompt, or \{prompt: "):
        parse_samples([{"text": "a"}], [0], None)
    grid = SampleGrid("/tmp", prompts=[f"p{i}" for i in range(8)], seeds=[0], scales=[1.0], columns=2)
    rows = [[Image.new("RGB", (8, 8)) for _ in range(8)]]
    wrapped, row_labels, col_labels = grid._layout(rows, grid.samples)
    assert [len(r) for r in wrapped] == [2, 2, 2, 2] and col_labels == ["column 1", "column 2"]
    assert row_labels[0] == "LoRA x1 #1-2" and row_labels[-1] == "LoRA x1 #7-8"
