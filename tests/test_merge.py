"""python -m sdtune.merge: the fused model matches the LoRAs applied live, and it never overwrites a
file or folder that sdtune.merge did not write."""

from __future__ import annotations

import json

import pytest
import torch

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.merge import merge
from tests.helpers.config import compose_tool
from tests.helpers.loras import lora_file
from tests.helpers.models import tiny_model, unet_inputs


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kolors"])
def test_merged_model_reloaded_from_disk_matches_unmerged(tmp_path, family):
    a, b = lora_file(tmp_path, family, 1), lora_file(tmp_path, family, 2)
    out = tmp_path / "merged"
    cfg = compose_tool("merge", f"loras=[{a}@0.6,{b}@0.4]", f"out={out}", "save_dtype=fp32")
    folder, single = merge(cfg)
    fam, parts = build_parts({"family": family, "path": str(tiny_model(family))})
    apply_loras(parts, fam, [LoraRef(a, 0.6), LoraRef(b, 0.4)])
    x, t, kw = unet_inputs(family)
    with torch.no_grad():
        expected = parts.unet(x, t, **kw).sample
        reloaded = get_family(family).load(str(folder)).unet
        torch.testing.assert_close(reloaded(x, t, **kw).sample, expected, rtol=0, atol=1e-4)
        assert not any(".lora_" in n for n, _ in reloaded.named_parameters())  # truly fused
        if family == "kolors":
            assert single is None  # Kolors has no single-file format
        else:
            from_single = get_family(family).load(str(single), config=str(tiny_model(family))).unet
            torch.testing.assert_close(from_single(x, t, **kw).sample, expected, rtol=0, atol=1e-4)
    record = json.loads((folder / "sdtune_merge.json").read_text())
    assert [entry["weight"] for entry in record["loras"]] == [0.6, 0.4]


def test_merge_never_overwrites_a_neighbouring_file(tmp_path):
    a = lora_file(tmp_path, "sd15", 1)
    neighbour = tmp_path / "anime-v1.safetensors"  # what with_suffix() would have hit for "anime-v1.5"
    neighbour.write_bytes(b"the user's own model")
    folder, single = merge(compose_tool("merge", f"loras=[{a}]", f"out={tmp_path / 'anime-v1.5'}", "save_dtype=fp32"))
    assert single == tmp_path / "anime-v1.5.safetensors" and single.is_file()
    assert neighbour.read_bytes() == b"the user's own model"
    assert oct(folder.stat().st_mode & 0o777) == "0o755"
    taken = tmp_path / "base.safetensors"
    taken.write_bytes(b"a base model")
    with pytest.raises(Exception, match="base.safetensors' exists and was not written by sdtune.merge"):
        merge(compose_tool("merge", f"loras=[{a}]", f"out={tmp_path / 'base'}"))
    assert taken.read_bytes() == b"a base model" and not (tmp_path / "base").exists()
    merge(compose_tool("merge", f"loras=[{a}]", f"out={tmp_path / 'anime-v1.5'}", "save_dtype=fp32"))  # ours: replaced


def test_merge_refuses_a_foreign_output_folder(tmp_path):
    a = lora_file(tmp_path, "sd15", 1)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="was not written by sdtune.merge"):
        merge(compose_tool("merge", f"loras=[{a}]", f"out={out}"))
    assert (out / "notes.txt").read_text() == "keep me"
