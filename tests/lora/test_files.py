"""LoRA files: diffusers key rules round-trip, header metadata, bad files, wrong family."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from sdtune.lora.files import LoraHeader, check_family, read_lora, save_lora
from sdtune.lora.keys import diffusers_to_peft, peft_to_diffusers
from sdtune.lora.layers import LoraSpec
from sdtune.utils.errors import LoraFileError

SPEC = LoraSpec(rank=4, alpha=8.0, targets=("to_q", "to_out.0"))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"):
        out[f"{m}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        out[f"{m}.lora_B.weight"] = torch.randn(32, 4, generator=g)
    return out


def _meta(**kw):
    return LoraHeader(SPEC, family="sd15", base_model="tiny", base_model_version="sd_v1", resolution=64, **kw)


def test_diffusers_key_rules_round_trip():
    t = _tensors()
    d = peft_to_diffusers(t)
    assert all(k.startswith("unet.") and (k.endswith(".lora.down.weight") or k.endswith(".lora.up.weight")) for k in d)
    back = diffusers_to_peft(d)
    assert back.keys() == t.keys() and all(back[k] is t[k] for k in t)


def test_save_and_read_keep_tensors_and_true_alpha(tmp_path):
    path = save_lora(tmp_path / "x.safetensors", _tensors(), _meta(config={"lora": {"rank": 4}}, steps=7, num_train_images=3), format="diffusers")
    lora = read_lora(path)
    assert lora.spec == SPEC and lora.family == "sd15"
    for k, v in _tensors().items():
        assert torch.equal(lora.tensors[k], v)
    meta = lora.metadata
    assert json.loads(meta["lora_adapter_metadata"]) == {"unet.lora_alpha": 8.0, "unet.r": 4, "unet.target_modules": ["to_q", "to_out.0"]}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"], meta["ss_num_train_images"]) == ("4", "8.0", "7", "3")
    assert lora.config == {"lora": {"rank": 4}}
    assert not {"sdtune.rank", "sdtune.alpha", "sdtune.targets"} & meta.keys()  # one machine-read place per fact
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_not_safetensors_and_truncated_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(LoraFileError, match="bad.safetensors.*not a readable .safetensors file"):
        read_lora(bad)
    good = save_lora(tmp_path / "good.safetensors", _tensors(), _meta(), format="diffusers")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoraFileError, match="cut.safetensors.*truncated"):
        read_lora(cut)
    with pytest.raises(LoraFileError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")


def test_wrong_family_is_refused_by_header(tmp_path):
    lora = read_lora(save_lora(tmp_path / "x.safetensors", _tensors(), _meta(), format="diffusers"))
    check_family(lora, "sd15", "x.safetensors")  # same family: fine
    with pytest.raises(LoraFileError, match="is a sd15 LoRA but the base model is sdxl"):
        check_family(lora, "sdxl", "x.safetensors")


def test_save_never_leaves_a_partial_file_over_a_good_one(tmp_path):
    target = save_lora(tmp_path / "x.safetensors", _tensors(), _meta(), format="diffusers")
    before = target.read_bytes()
    # safetensors itself fails inside the write (metadata values must be strings)
    with pytest.raises(Exception, match="(?i)str|string|metadata"):
        save_lora(target, _tensors(), replace(_meta(), carried={"bad": 1}), format="diffusers")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    with pytest.raises(LoraFileError, match="not_a_lora_key"):
        save_lora(target, {"not_a_lora_key": torch.zeros(1)}, _meta(), format="diffusers")
    assert target.read_bytes() == before
