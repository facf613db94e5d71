"""Catalogue, interop: the files we write, read by each peer tool's own rules.

* **merge's text encoders** must be stored in the key layout both transformers 4.x (which kohya
  sd-scripts pins) and 5.x read. transformers 4.x's ``CLIPTextModel`` nests its weights under
  ``self.text_model = CLIPTextTransformer(config)`` (transformers v4.54.1,
  src/transformers/models/clip/modeling_clip.py) and loads a file by exact key, so a file without
  ``text_model.`` loads random weights with a mere "newly initialized" warning; transformers 5
  flattens the class and maps ``text_model.`` away on loading (conversion_mapping.py:
  ``"CLIPTextModel": [PrefixChange(prefix_to_remove="text_model")]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.inference import LoraRef, apply_loras
from sdtune.lora_apply import fuse
from sdtune.lora_keys import kohya_module_name, te_file_module, te_kohya_prefix
from sdtune.merge import merge

from ..conftest import ROOT, tiny_model
from .test_catalogue_filesystem import snapshot

MODEL = {"sd15": "tiny", "sdxl": "tiny_sdxl", "kolors": "tiny_kolors"}


def _compose(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


# -- merge: text encoders in the layout transformers 4.x and 5.x both read ------------------------
def _kohya_lora_with_text_encoders(path: Path, family: str) -> Path:
    """A kohya LoRA (as kohya sd-scripts writes one) with random rank-2 layers on two UNet attention
    linears and on the first attention/MLP linears of every text encoder."""
    fam = get_family(family)
    parts = fam.load(str(tiny_model(family)))
    g = torch.Generator().manual_seed(0)
    tensors = {}

    def layer(name: str, module: torch.nn.Linear) -> None:
        out_f, in_f = module.weight.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, in_f, generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(2.0)

    unet_layers = [n for n, m in parts.unet.named_modules() if n.endswith(("attn2.to_q", "attn1.to_v"))][:2]
    for m in unet_layers:
        layer(kohya_module_name(m, fam, parts.unet.config), parts.unet.get_submodule(m))
    for index, (encoder, kind) in enumerate(zip(parts.text_encoders, fam.text_encoder_kinds, strict=True)):
        linears = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n
                   and n.endswith(("q_proj", "fc1", "query_key_value", "dense_h_to_4h"))]
        assert linears, f"no text-encoder layer found in {type(encoder).__name__}"
        prefix = te_kohya_prefix(index, len(parts.text_encoders))
        for m in linears:
            layer(prefix + te_file_module(m, kind).replace(".", "_"), encoder.get_submodule(m))
    save_file(tensors, str(path))
    return path


def _file_keys(folder: Path) -> list[str]:
    keys = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            keys += list(fh.keys())
    return sorted(keys)


def _legacy_keys(encoder: torch.nn.Module) -> list[str]:
    """The state-dict keys transformers 4.x's class of ``encoder`` has (and loads by exact match):
    4.x ``CLIPTextModel`` = ``text_model.`` + the flattened 5.x class's keys; 4.x
    ``CLIPTextModelWithProjection`` and diffusers' ChatGLM are laid out as in 5.x."""
    keys = encoder.state_dict().keys()
    if type(encoder).__name__ == "CLIPTextModel" and not hasattr(encoder, "text_model"):
        keys = ["text_model." + k for k in keys]
    return sorted(keys)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kolors"])
def test_merged_text_encoders_are_in_the_layout_transformers_4_and_5_read(family, tmp_path):
    """Catches merge's text_encoder/model.safetensors written in transformers 5's flattened layout
    (no ``text_model.``), which transformers 4.x, kohya's pin, loads as random weights with only a
    warning. transformers 5.25 must load the folder with exactly the fused weights."""
    (tmp_path / "in").mkdir()
    lora = _kohya_lora_with_text_encoders(tmp_path / "in" / "te_lora.safetensors", family)
    before = snapshot(tmp_path / "in"), snapshot(tiny_model(family))
    out = tmp_path / "merged"
    merge(_compose("merge", f"loras=[{lora}]", f"out={out}", f"model={MODEL[family]}", "save_dtype=fp32",
                   "single_file=false"))

    fam, parts = build_parts({"family": family, "path": str(tiny_model(family))})
    base = [{k: v.clone() for k, v in e.state_dict().items()} for e in parts.text_encoders]
    fuse(parts, apply_loras(parts, fam, [LoraRef(str(lora), 1.0)]))
    index = json.loads((out / "model_index.json").read_text())
    for i, (subfolder, fused) in enumerate(zip(fam.text_encoder_subfolders, parts.text_encoders, strict=True)):
        assert index[subfolder][1] == type(fused).__name__
        assert _file_keys(out / subfolder) == _legacy_keys(fused), f"{subfolder}: not the key layout transformers 4.x loads"
        reloaded = type(fused).from_pretrained(str(out / subfolder))  # transformers 5.25's own loading
        got, want = reloaded.state_dict(), fused.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{subfolder}: {k} is not the merged weight")
        assert any(not torch.equal(want[k], base[i][k]) for k in want)  # the LoRA changed this encoder
    assert (snapshot(tmp_path / "in"), snapshot(tiny_model(family))) == before  # nothing the user gave us changed
