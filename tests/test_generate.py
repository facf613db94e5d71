"""python -m sdtune.generate: LoRA mixing as diffusers mixes, the compare grid and its records, the
guidance a base asks for, and refusing LoRAs that do not fit (in generate and merge alike)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diffusers
import pytest
import torch
from PIL import Image

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.generate import generate
from sdtune.inference.loading import LoraRef, apply_loras, parse_loras
from sdtune.merge import merge
from sdtune.utils.errors import ConfigError, LoraFileError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_tool
from tests.helpers.loras import lora_file
from tests.helpers.models import tiny_model, unet_inputs

MODEL = {"sd15": "tiny", "sdxl": "tiny_sdxl", "kolors": "tiny_kolors"}
PIPELINE = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}


def test_parse_loras_forms():
    assert parse_loras(["a.safetensors", "b.safetensors@0.3", {"path": "c", "weight": 0.5}]) == [
        LoraRef("a.safetensors", 1.0), LoraRef("b.safetensors", 0.3), LoraRef("c", 0.5)]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_mixing_two_loras_matches_diffusers_set_adapters(tmp_path, family):
    a, b = lora_file(tmp_path, family, 1), lora_file(tmp_path, family, 2)
    x, t, kw = unet_inputs(family)
    fam, parts = build_parts({"family": family, "path": str(tiny_model(family))})
    apply_loras(parts, fam, [LoraRef(a, 0.7), LoraRef(b, 0.3)])
    pipe = PIPELINE[family].from_pretrained(tiny_model(family))
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    with torch.no_grad():
        ours, theirs = parts.unet(x, t, **kw).sample, pipe.unet(x, t, **kw).sample
        pipe.set_adapters(["a"], adapter_weights=[1.0])
        only_a = pipe.unet(x, t, **kw).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - only_a).abs().max() > 1e-4  # the mix really is a mix


def _drop_one_module(tensors):
    key = sorted(k for k in tensors if "attn2.to_k" in k)[0].rsplit(".lora_", 1)[0]
    return {k: v for k, v in tensors.items() if not k.startswith(key + ".")}


def _add_foreign_module(tensors):
    """A layer of a target type (to_q) at a path this UNet does not have (a tenth down block)."""
    name = "down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"
    return {**tensors, f"{name}.lora_A.weight": torch.zeros(2, 32), f"{name}.lora_B.weight": torch.zeros(32, 2)}


@pytest.mark.parametrize(("mutate", "message"), [
    (_drop_one_module, r"LoRA layer\(s\) of its targets are absent from the file, e.g. \['down_blocks"),
    (_add_foreign_module, r"match no module of this UNet, e.g. \['down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"),
])
def test_generate_and_merge_name_keys_that_do_not_fit(tmp_path, mutate, message):
    bad = lora_file(tmp_path, "sd15", 3, mutate=mutate)
    with pytest.raises(LoraFileError, match=message):
        generate(compose_tool("generate", f"loras=[{bad}]", "prompt=x", "steps=1", "num_images=1"), tmp_path)
    with pytest.raises(LoraFileError, match=message):
        merge(compose_tool("merge", f"loras=[{bad}]", f"out={tmp_path / 'm'}"))
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_generate_cli_compare_grid_with_model_from_the_lora_header(tmp_path):
    a = lora_file(tmp_path, "sd15", 1)
    run = tmp_path / "gen"
    proc = run_cli(f"loras=[{a}@0.8]", "prompt=a red circle", "num_images=3", "steps=3", "compare=true",
                   f"hydra.run.dir={run}", module="sdtune.generate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in run.glob("*.png"))
    assert names == ["grid.png", "off_seed0.png", "off_seed1.png", "off_seed2.png", "seed0.png", "seed1.png", "seed2.png"]
    on, off = Image.open(run / "seed1.png"), Image.open(run / "off_seed1.png")
    assert on.size == (64, 64) and list(on.getdata()) != list(off.getdata())
    grid = Image.open(run / "grid.png")
    assert grid.size == (120 + 3 * 164, 34 + 2 * 164)  # 2 rows (off, on) x 3 seeds
    record = json.loads((run / "generation.json").read_text())
    assert record["model"]["path"] == str(tiny_model("sd15"))
    assert (record["prompt"], record["negative_prompt"], record["steps"], record["size"], record["seeds"]) == (
        "a red circle", None, 3, [64, 64], [0, 1, 2])
    assert record["guidance"] == get_family("sd15").default_guidance
    [lora] = record["loras"]
    data = Path(a).read_bytes()
    tensor_bytes = data[8 + int.from_bytes(data[:8], "little"):]  # after the safetensors header, as A1111 hashes
    assert lora == {"path": str(Path(a).resolve()), "weight": 0.8, "sha256": hashlib.sha256(data).hexdigest(),
                    "tensor_sha256": hashlib.sha256(tensor_bytes).hexdigest()}
    # every PNG carries A1111's "parameters" text: the LoRA as a <lora:name:weight> tag when it was on
    on_text, off_text = on.text["parameters"], off.text["parameters"]
    stem = Path(a).stem
    assert on_text.splitlines()[0] == f"a red circle <lora:{stem}:0.8>" and off_text.splitlines()[0] == "a red circle"
    assert "Steps: 3, Sampler: " in on_text and ", CFG scale: 7.5, Seed: 1, Size: 64x64, Model: tiny-sd15" in on_text
    assert f'Lora hashes: "{stem}: {lora["tensor_sha256"][:12]}"' in on_text and "Lora hashes" not in off_text
    # a broken LoRA is a clear CLI error
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not safetensors")
    proc = run_cli(f"loras=[{bad}]", "prompt=x", f"hydra.run.dir={tmp_path / 'gen2'}", module="sdtune.generate")
    assert proc.returncode == 2 and "is not a readable .safetensors file" in proc.stderr


def test_generate_samples_at_the_base_models_own_guidance_unless_told(tmp_path):
    """``guidance`` unset: the scale recorded with the base model in the LoRA header (the toy bases
    draw best at 2), else the family's default; an explicit ``guidance=`` wins. Checked on the
    images, not only on the record: the default must draw exactly what the explicit scale draws."""
    plain = lora_file(tmp_path, "sd15", 1)  # header model without `guidance`: the family's 7.5
    recorded = lora_file(tmp_path, "sd15", 2, model_extra={"guidance": 2.0})

    def draw(lora, *overrides):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        out.mkdir()
        generate(compose_tool("generate", f"loras=[{lora}]", "prompt=a red circle", "steps=2", "num_images=1", *overrides), out)
        return json.loads((out / "generation.json").read_text())["guidance"], list(Image.open(out / "seed0.png").getdata())

    g, default = draw(recorded)
    assert g == 2.0 and default == draw(recorded, "guidance=2.0")[1] != draw(recorded, "guidance=7.5")[1]
    g, default = draw(plain)
    assert g == get_family("sd15").default_guidance == 7.5 and default == draw(plain, "guidance=7.5")[1]
    assert draw(recorded, "guidance=4")[0] == 4.0
    with pytest.raises(ConfigError, match=r"guidance must be a number > 0, got -1"):
        draw(recorded, "guidance=-1")
