"""``inference/loading.py``: the LoRA list of generate and merge (``FILE@WEIGHT``) is checked by the
shared value checks before any file is read."""

from __future__ import annotations

import pytest

from sdtune.inference.loading import parse_loras
from sdtune.utils.errors import ConfigError


def test_weights_parse_from_text_and_mappings():
    refs = parse_loras(["a.safetensors@0.7", "b.safetensors", {"path": "c.safetensors", "weight": -0.5}])
    assert [(r.path, r.weight) for r in refs] == [("a.safetensors", 0.7), ("b.safetensors", 1.0), ("c.safetensors", -0.5)]


@pytest.mark.parametrize(("item", "words"), [
    ("a.safetensors@nan", "loras[0] weight must be a finite number, got nan"),
    ("a.safetensors@inf", "loras[0] weight must be a finite number, got inf"),
    ("a.safetensors@heavy", "loras[0] weight must be a number, got 'heavy'"),
    ({"path": "a.safetensors", "weight": [1]}, "loras[0] weight must be a number, got [1]"),
])
def test_a_weight_that_is_no_finite_number_is_refused_with_the_fix(item, words):
    with pytest.raises(ConfigError) as err:
        parse_loras([item])
    assert words in str(err.value) and "Fix: e.g. a.safetensors@0.8" in str(err.value)
