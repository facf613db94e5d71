"""LoRA files other tools wrote, through generate and merge, against a merge computed by hand.

Layouts: diffusers' current ``save_lora_weights`` (UNet and text encoder, with and without its
adapter metadata), peft's ``save_pretrained`` (with its adapter_config.json), and kohya files with
text-encoder layers (``lora_te_`` for SD1.5, ``lora_te1_``/``lora_te2_`` for SDXL) and a
different alpha per module. The hand merge is ``W + weight * alpha / rank * B @ A`` per layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import save_file

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.generate import generate
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.lora.files import read_lora
from sdtune.merge import merge
from sdtune.utils.errors import LoraFileError
from tests.helpers.models import tiny_model
from tests.helpers.paths import ROOT

MODEL = {"sd15": "tiny", "sdxl": "tiny_sdxl"}
UNET_TARGETS = ("to_q", "to_v")
TE_TARGETS = ("q_proj", "v_proj", "fc1")
WEIGHT = 0.7


def _compose(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _parts(family: str):
    return build_parts({"family": family, "path": str(tiny_model(family))})[1]


def _random_layers(model, targets, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """peft-named LoRA weights for every Linear layer of ``model`` matching ``targets``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return out


def _alphas(tensors, pick) -> dict[str, float]:
    return {k[: -len(".lora_A.weight")]: pick(i) for i, k in enumerate(sorted(k for k in tensors if k.endswith("lora_A.weight")))}


def _hand_merged(model, tensors, alphas) -> dict[str, torch.Tensor]:
    """The weights a merge must produce: each layer's W + WEIGHT * alpha / rank * B @ A."""
    out = {}
    for module, alpha in alphas.items():
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        base = model.get_submodule(module).weight.detach()
        out[module] = base + WEIGHT * alpha / a.shape[0] * (b @ a)
    return out


def _case(family: str, layout: str, tmp_path):
    """(file, {component: (layers, alphas)}): the file as the other tool writes it and what it holds."""
    parts = _parts(family)
    unet = _random_layers(parts.unet, UNET_TARGETS, 4, 1)
    tes = [_random_layers(te, TE_TARGETS, 2, 2 + i) for i, te in enumerate(parts.text_encoders)]
    if layout.startswith("diffusers"):
        from diffusers import StableDiffusionPipeline

        meta = layout == "diffusers+metadata"
        StableDiffusionPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=unet, text_encoder_lora_layers=tes[0], safe_serialization=True,
            unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8.0, "target_modules": list(UNET_TARGETS)} if meta else None,
            text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": 1.0, "target_modules": list(TE_TARGETS)} if meta else None,
        )
        expected = {"denoiser": (unet, _alphas(unet, lambda i: 8.0 if meta else 4.0)),
                    0: (tes[0], _alphas(tes[0], lambda i: 1.0 if meta else 2.0))}
        return tmp_path / "pytorch_lora_weights.safetensors", expected
    if layout == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.utils import set_peft_model_state_dict

        model = get_peft_model(parts.unet, LoraConfig(r=4, lora_alpha=6.0, target_modules=list(UNET_TARGETS)))
        loaded = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in unet.items()})
        assert not loaded.unexpected_keys
        model.save_pretrained(tmp_path / "peft")  # adapter_model.safetensors + adapter_config.json
        return tmp_path / "peft" / "adapter_model.safetensors", {"denoiser": (unet, _alphas(unet, lambda i: 6.0))}
    # kohya, with text-encoder layers and a different alpha per module (1, 2 or 3 by position)
    from sdtune.lora.keys import kohya_module_name

    raw, expected = {}, {}
    prefixes = ["lora_te_"] if len(tes) == 1 else ["lora_te1_", "lora_te2_"]
    for component, layers, name_of in [("denoiser", unet, lambda m: kohya_module_name(m, family, parts.unet.config)),
                                       *[(i, t, lambda m, p=prefixes[i]: p + m.replace(".", "_")) for i, t in enumerate(tes)]]:
        alphas = _alphas(layers, lambda i: float(1 + i % 3))
        for module, alpha in alphas.items():
            stem = name_of(module)
            raw[f"{stem}.lora_down.weight"] = layers[f"{module}.lora_A.weight"]
            raw[f"{stem}.lora_up.weight"] = layers[f"{module}.lora_B.weight"]
            raw[f"{stem}.alpha"] = torch.tensor(alpha)
        expected[component] = (layers, alphas)
    path = tmp_path / "civitai.safetensors"
    save_file(raw, str(path), metadata={"ss_network_module": "networks.lora"})
    return path, expected


CASES = [("sd15", "diffusers+metadata"), ("sd15", "diffusers"), ("sd15", "peft"), ("sd15", "kohya"), ("sdxl", "kohya")]


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def test_merge_and_generate_apply_foreign_files_like_a_hand_merge(tmp_path, family, layout):
    path, expected = _case(family, layout, tmp_path)
    lora = read_lora(path)
    assert lora.family is None  # another tool's file: no sdtune header, the family comes from model=
    base = _parts(family)
    models = {c: base.unet if c == "denoiser" else base.text_encoders[c] for c in expected}
    hand = {c: _hand_merged(models[c], layers, alphas) for c, (layers, alphas) in expected.items()}
    assert set(hand) == ({"denoiser", 0} if family == "sd15" and layout != "peft" else {"denoiser"} if layout == "peft" else {"denoiser", 0, 1})

    # merge: the saved model holds exactly the hand-merged weights, text encoders included
    out = tmp_path / "merged"
    merge(_compose("merge", f"model={MODEL[family]}", f"loras=[{path}@{WEIGHT}]", f"out={out}", "save_dtype=fp32",
                   "single_file=false"))
    merged = build_parts({"family": family, "path": str(out)})[1]
    for component, weights in hand.items():
        model = merged.unet if component == "denoiser" else merged.text_encoders[component]
        for module, weight in weights.items():
            torch.testing.assert_close(model.get_submodule(module).weight, weight, rtol=0, atol=1e-4)

    # generate's path (apply_loras): each model computes what its hand-merged weights compute
    live = _parts(family)
    adapters = apply_loras(live, get_family(family), [LoraRef(str(path), WEIGHT)])
    assert set(adapters) == set(hand)
    for component, weights in hand.items():
        model = live.unet if component == "denoiser" else live.text_encoders[component]
        for module, weight in weights.items():
            layer = model.get_submodule(module)
            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, layer.base_layer.bias),
                                           rtol=0, atol=1e-4)


def test_generate_renders_a_kohya_file_with_text_encoder_layers_as_the_hand_merge(tmp_path):
    """The images themselves: generate with the file equals the pipeline on hand-merged weights."""
    path, expected = _case("sd15", "kohya", tmp_path)
    out = tmp_path / "gen"
    out.mkdir()
    generate(_compose("generate", "model=tiny", f"loras=[{path}@{WEIGHT}]", "prompt=a red circle", "num_images=1",
                      "steps=3", "seed=5"), out)
    family, parts = build_parts({"family": "sd15", "path": str(tiny_model("sd15"))})

    def render(components):
        with torch.no_grad():
            for component in components:
                layers, alphas = expected[component]
                model = parts.unet if component == "denoiser" else parts.text_encoders[component]
                for module, weight in _hand_merged(model, layers, alphas).items():
                    model.get_submodule(module).weight.copy_(weight)
        pipe = family.build_pipeline(parts)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(prompt="a red circle", num_inference_steps=3, guidance_scale=family.guidance({}), height=64,
                     width=64, generator=torch.Generator("cpu").manual_seed(5)).images[0]
        return np.asarray(image, dtype=np.int16)

    ours = np.asarray(Image.open(out / "seed5.png"), dtype=np.int16)
    unet_only = render(["denoiser"])
    assert np.abs(ours - unet_only).max() > 8  # the text-encoder layers change the picture...
    assert np.abs(ours - render([0])).max() <= 1  # ...and with them it is the hand merge (uint8 rounding at most)


@pytest.mark.parametrize(("marker", "name"), [
    (".hada_t1", r"LyCORIS LoHa with Tucker decomposition \(hada_t1\)"),
    (".lokr_t2", r"LyCORIS LoKr with Tucker decomposition \(lokr_t2\)"),
    (".lora_mid.weight", r"LyCORIS LoCon with Tucker decomposition \(lora_mid\)"), (".oft_blocks", "OFT"),
])
def test_other_layouts_are_refused_by_name(tmp_path, marker, name):
    """Layouts sdtune cannot apply (plain LoRA, DoRA, LoHa and LoKr it can: tests/lora/test_adapters.py) are named."""
    path = tmp_path / "lycoris.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in{marker}": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraFileError, match=rf"this is a {name} file .*sdtune applies LoRA, DoRA, LoHa and LoKr "
                                            r"\(without Tucker factors\) only"):
        read_lora(path)


def test_text_encoder_layers_that_fit_no_layer_are_named(tmp_path):
    path, _ = _case("sd15", "kohya", tmp_path)
    from safetensors.torch import load_file

    raw = load_file(str(path))
    raw["lora_te_text_model_encoder_layers_99_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 32)
    raw["lora_te_text_model_encoder_layers_99_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 2)
    save_file(raw, str(path))
    parts = _parts("sd15")
    with pytest.raises(LoraFileError, match=r"does not match this sd15 model: 2 text-encoder tensor\(s\) match no layer "
                                             r"of this model's text encoder\(s\), e.g. \['lora_te_text_model_encoder_layers_99"):
        apply_loras(parts, get_family("sd15"), [LoraRef(str(path))])
    lora_layers = [n for m in (parts.unet, *parts.text_encoders) for n, _ in m.named_modules() if n.endswith("lora_A")]
    assert not lora_layers  # nothing half-applied


@pytest.mark.parametrize(("layout", "message"), [
    ("kohya", r"holds \d+ text-encoder tensor\(s\) \(e.g. 'lora_te_.*which sdtune.export would drop"),
    ("diffusers", r"holds \d+ text-encoder tensor\(s\) \(e.g. 'text_encoder\..*which sdtune.export would drop"),
])
def test_export_refuses_what_a_conversion_would_lose(tmp_path, layout, message):
    from sdtune.export import export_lora

    path, _ = _case("sd15", layout, tmp_path)
    with pytest.raises(LoraFileError, match=message):
        export_lora(path, tmp_path / "out.safetensors", format="diffusers", family="sd15")
    assert not (tmp_path / "out.safetensors").exists()


def test_export_converts_a_peft_file_with_its_adapter_config(tmp_path):
    """peft's alpha lives in adapter_config.json: the converted file carries it (6, not rank 4)."""
    from sdtune.export import export_lora

    path, expected = _case("sd15", "peft", tmp_path)
    out = export_lora(path, tmp_path / "out.safetensors", format="diffusers", family="sd15")
    lora = read_lora(out)
    assert (lora.spec.rank, lora.spec.alpha, lora.family) == (4, 6.0, "sd15")
    layers, _ = expected["denoiser"]
    assert lora.tensors.keys() == layers.keys() and all(torch.equal(lora.tensors[k], layers[k]) for k in layers)


def test_export_converts_a_headerless_kohya_sdxl_file_offline(tmp_path):
    """A Civitai-style kohya file (no header, SGM block names) converts to the diffusers layout with
    --family alone: names resolve against SDXL's standard layout, the alpha is kept."""
    from safetensors.torch import load_file

    from sdtune.export import denoiser_module_names, export_lora
    from sdtune.families.arch import architecture
    from sdtune.lora.keys import peft_to_kohya

    config = architecture("sdxl")["unet"]
    modules = [m for m in denoiser_module_names(config, "sdxl") if m.endswith("attn1.to_q")][:3]
    g = torch.Generator().manual_seed(0)
    layers = {}
    for m in modules:
        layers[f"{m}.lora_A.weight"] = torch.randn(4, 640 if "down_blocks.1" in m or "up_blocks.1" in m else 1280, generator=g)
        layers[f"{m}.lora_B.weight"] = torch.randn(layers[f"{m}.lora_A.weight"].shape[1], 4, generator=g)
    path = tmp_path / "civitai_sdxl.safetensors"
    save_file(peft_to_kohya(layers, 2.0, "sdxl", config), str(path))
    assert all("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in load_file(str(path)))
    out = export_lora(path, tmp_path / "out.safetensors", format="diffusers", family="sdxl")
    lora = read_lora(out)
    assert (lora.family, lora.spec.alpha) == ("sdxl", 2.0)
    assert lora.tensors.keys() == layers.keys() and all(torch.equal(lora.tensors[k], layers[k]) for k in layers)
