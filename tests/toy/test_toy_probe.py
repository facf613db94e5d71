"""The toy domain and its probe: the probe reads exactly what the generator drew, and refuses to
see a shape or a colour that is not there."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdtune.toy.concepts import TRIGGERS, concept_shares, write_concept_dataset
from sdtune.toy.domain import ALL_COLOURS, COLOURS, CONCEPT_COLOURS, SHAPES, Scene, random_scene, render
from sdtune.toy.probe import read


def test_probe_reads_every_generated_scene_exactly():
    rng = random.Random(0)
    scenes = [random_scene(rng, colours=tuple(ALL_COLOURS)) for _ in range(300)]
    readings = [read(render(s)) for s in scenes]
    assert [(r.shape, r.colour, r.background) for r in readings] == [(s.shape, s.colour, s.background) for s in scenes]


def test_probe_survives_the_blur_of_a_small_decoder():
    """Generated images are soft-edged; a mild blur must not change what the probe says."""
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(120)]
    readings = [read(render(s).filter(ImageFilter.GaussianBlur(1.5))) for s in scenes]
    right = sum((r.shape, r.colour) == (s.shape, s.colour) for r, s in zip(readings, scenes))
    assert right / len(scenes) >= 0.95


@pytest.mark.parametrize("image", [
    Image.new("RGB", (64, 64), COLOURS["blue"]),                                   # nothing drawn
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),  # noise
])
def test_probe_sees_no_shape_where_there_is_none(image):
    reading = read(image)
    assert reading.shape is None or reading.shape_score < 0.5


def test_concept_colours_are_far_from_the_palette():
    """A base model's nearest palette colour must never read as a concept colour."""
    for concept in CONCEPT_COLOURS.values():
        nearest = min(np.linalg.norm(np.subtract(concept, c)) for c in COLOURS.values())
        assert nearest > 90


def test_concept_dataset_binds_the_trigger_word_to_its_colour(tmp_path):
    root = write_concept_dataset(tmp_path / "set", triggers=("sks", "olq"), per_trigger=6)
    rows = list(csv.DictReader(open(root / "metadata.csv", encoding="utf-8")))
    assert len(rows) == 12
    for row in rows:
        trigger = row["text"].split()[-2]
        reading = read(Image.open(root / row["file_name"]))
        assert reading.background == TRIGGERS[trigger]
        assert f"a {reading.colour} {reading.shape} on a {trigger} background" == row["text"]
    shares = concept_shares([render(Scene("square", "red", "pink"))] * 3 + [render(Scene("square", "pink", "blue"))], "sks")
    assert shares.share("pink") == 0.75 and shares.share("cyan") == 0.0  # the ground counts, not the shape
    assert set(SHAPES) == {r["text"].split()[2] for r in rows}


def test_bundled_quickstart_is_the_concept_generator_output(tmp_path):
    """examples/quickstart is what `python -m sdtune.toy.concepts` writes, pixel for pixel."""
    from tests.helpers.paths import QUICKSTART

    fresh = write_concept_dataset(tmp_path / "q", triggers=("sks",), per_trigger=12)
    assert (fresh / "metadata.csv").read_text() == (QUICKSTART / "metadata.csv").read_text()
    names = sorted(p.name for p in (fresh / "images").iterdir())
    assert names == sorted(p.name for p in (QUICKSTART / "images").iterdir())
    for name in names:
        a, b = (np.asarray(Image.open(root / "images" / name).convert("RGB")) for root in (fresh, QUICKSTART))
        assert np.array_equal(a, b), name
