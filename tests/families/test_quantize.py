"""model.quantize: the planner's byte count against the loaded parts, the checks, and an export
that quantization leaves unchanged. The tiny models load quantized through diffusers' and
transformers' own configs (torchao int8 runs on the CPU)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors import safe_open

from sdtune.families import get_family
from sdtune.families.arch import architecture
from sdtune.families.quantize import part_bytes, quantized_text_encoders, stored_bytes
from sdtune.families.quantize_load import (
    WeightOnlyLinear,
    is_quantized,
    load_kwargs,
    quantize_in_place,
    text_encoder_kwargs,
)
from sdtune.run.callbacks import write_run_lora
from sdtune.run.checks import check_device, validate
from sdtune.training.module import LoRATrainingModule
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.models import tiny_model

FAMILIES = ("sd15", "sdxl", "kolors", "flux", "sd35")


def _meta_parts(family):
    """The denoiser and the large text encoders of ``family``'s tiny folder, built on the meta device
    from its configs (what the planner counts), with the loaded classes."""
    fam, folder = get_family(family), tiny_model(family)
    arch = architecture(fam, folder)
    with torch.device("meta"):
        denoiser = getattr(diffusers, fam.denoiser_class).from_config(arch[fam.denoiser_subfolder])
        encoders = fam.random_text_parts(arch, meta=True)[1]
    return fam, folder, denoiser, {i: encoders[i] for i in quantized_text_encoders(fam)}


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_bytes_planned_on_meta_equal_the_loaded_parts(family):
    """part_bytes (meta, no weights) == the bytes the loaders really store, for the denoiser and
    each large text encoder (T5's wo and ChatGLM's output_layer by each library's own rule)."""
    fam, folder, meta_denoiser, meta_encoders = _meta_parts(family)
    dtype = torch.bfloat16
    denoiser = getattr(diffusers, fam.denoiser_class).from_pretrained(
        folder, subfolder=fam.denoiser_subfolder, torch_dtype=dtype, **load_kwargs("int8", dtype))
    assert is_quantized(denoiser)
    assert stored_bytes(denoiser) == part_bytes(meta_denoiser, "int8", dtype)
    assert stored_bytes(denoiser) < part_bytes(meta_denoiser, None, dtype)  # it did quantize
    for index, meta in meta_encoders.items():
        encoder = type(meta).from_pretrained(folder, subfolder=fam.text_encoder_subfolders[index], dtype=dtype,
                                             **text_encoder_kwargs(fam, index, "int8", dtype))
        assert is_quantized(encoder), type(meta).__name__
        assert stored_bytes(encoder) == part_bytes(meta, "int8", dtype), type(meta).__name__
    assert bool(meta_encoders) == (family in ("kolors", "flux", "sd35"))
    for index in set(range(len(fam.text_encoder_kinds))) - set(meta_encoders):  # the CLIPs: never quantized
        assert text_encoder_kwargs(fam, index, "int8", dtype) == {}


def test_in_place_quantization_stores_what_the_loader_stores():
    """Single files and the bench's random parts are quantized in place: the same bytes as loading
    quantized, and T5 in fp16 keeps transformers' fp32 dtype plan (wo) when unquantized."""
    fam, folder, meta_denoiser, meta_encoders = _meta_parts("flux")
    dtype = torch.bfloat16
    denoiser = getattr(diffusers, fam.denoiser_class).from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
    assert not is_quantized(denoiser)
    quantize_in_place(denoiser, "int8", dtype)
    assert is_quantized(denoiser) and stored_bytes(denoiser) == part_bytes(meta_denoiser, "int8", dtype)
    t5 = type(meta_encoders[1]).from_pretrained(folder, subfolder="text_encoder_2", dtype=torch.float16)
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert stored_bytes(t5) == part_bytes(meta_encoders[1], None, torch.float16)


def test_quantized_linears_keep_no_full_precision_weight_for_the_backward():
    """Loaded int8 by the family, every quantized Linear computes through ``WeightOnlyLinear``: its forward
    saves nothing for the backward (torchao's own linear saves a dequantized copy of the weight, the
    memory int8 was to save), its input gradient is grad @ the dequantized weight, and fp16 inputs whose
    output torchao's int8 matmul (int8 values times x, scaled after) would overflow stay finite."""
    fam = get_family("sd15")
    parts = fam.load(str(tiny_model("sd15")), dtype=torch.float32, quantize={"denoiser": "int8"})
    layers = [m for m in parts.denoiser.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in layers if hasattr(m.weight, "__tensor_flatten__")]
    assert quantized and all(type(m) is WeightOnlyLinear for m in quantized)
    layer = quantized[0]
    weight = layer.weight.dequantize().float()
    torchao_linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    torchao_linear.weight, torchao_linear.bias = layer.weight, layer.bias  # the same int8 tensor, torchao's forward

    def saved(module, x):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            out = module(x)
        return out, shapes

    x = torch.randn(3, layer.in_features, requires_grad=True)
    out, ours = saved(layer, x)
    assert ours == [] and saved(torchao_linear, x)[1]  # torchao's keeps a weight-sized tensor (the fault)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.allclose(x.grad, grad @ weight, atol=1e-6)
    # an input aligned with row 0 whose true output is 100: the int8-first product is 100 / scale, past fp16
    row = layer.weight.qdata[0].float()
    big = (torch.sign(row) * 100.0 / weight[0].abs().sum())[None]
    assert float(big[0] @ row) > 65504
    half = layer.half()
    assert torch.isclose(half(big.half())[0, 0].float(), torch.tensor(100.0 + float(layer.bias[0])), rtol=1e-2)


def _cfg(*overrides):
    return compose_cfg("experiment=quickstart", "model=tiny", *overrides)


@pytest.mark.parametrize(("overrides", "expected"), [
    (("model.quantize=int4",), "model.quantize='int4' is not a quantization mode"),
    (("model.quantize.denoiser=q8",), "model.quantize.denoiser='q8' is not a quantization mode"),
    (("model.quantize=5",), "model.quantize=5 is not a quantization mode"),
    (("model.quantize.text_encoder=int8",), "sd15's text encoders are CLIPs"),
    (("model.quantize=int8", "lora.use_dora=true"), "Fix: lora.use_dora=false"),
    (("model.quantize=nf4", "lora.type=loha"), "bitsandbytes packs to (out*in/2, 1)"),
    (("model.quantize.denoiser=nf4", "lora.type=lokr"), "model.quantize.denoiser=nf4 with lora.type=lokr"),
    (("model.quantize=int8", "trainer=ddp"), "trainer.strategy=ddp, trainer.devices=2: a quantized base trains on one GPU"),
    (("model.quantize=int8", "trainer.devices=2"), "Fix: trainer=gpu trainer.devices=1, or model.quantize=null"),
])
def test_quantize_settings_refused_with_key_value_and_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(*overrides))
    assert expected in str(err.value) and "Fix:" in str(err.value)


def test_quantize_settings_accepted():
    """A plain mode on a family without a large text encoder quantizes its denoiser only; the mapping
    is completed (the part left out stays unquantized); LoHa trains on int8."""
    validate(_cfg("model.quantize=int8", "lora.type=loha"))
    cfg = _cfg("model.quantize.denoiser=int8")
    validate(cfg)
    assert resolved(cfg)["model"]["quantize"] == {"denoiser": "int8", "text_encoder": None}
    validate(compose_cfg("experiment=quickstart", "model=tiny_flux", "model.quantize.text_encoder=int8"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_cuda_modes_refused_before_loading_on_the_cpu(mode):
    check_device(_cfg("model.quantize=int8"))  # int8 runs here
    with pytest.raises(ConfigError) as err:
        check_device(_cfg(f"model.quantize={mode}"))
    assert f"model.quantize={mode} needs a CUDA GPU" in str(err.value)
    assert "model.quantize=int8 runs on any device" in str(err.value)


def test_export_of_a_quantized_run_has_the_unquantized_layout(tmp_path):
    """The same seed, LoRA and header on an int8 and an unquantized tiny base: the run's file writer
    gives the same keys, shapes, values and scale/alpha header (kohya and diffusers layouts)."""
    files = {}
    for mode in ("null", "int8"):
        module = LoRATrainingModule(resolved(_cfg(f"model.quantize={mode}", "lora.rank=4", "lora.alpha=8")))
        torch.manual_seed(0)
        module.setup("fit")
        assert is_quantized(module.parts.denoiser) == (mode == "int8")
        assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}  # LoRA stays fp32
        with torch.no_grad():  # B starts at zero: give the file non-trivial values, the same in both
            for i, (_, p) in enumerate(sorted(module.named_parameters())):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        for fmt in ("kohya", "diffusers"):
            files[mode, fmt] = write_run_lora(tmp_path / mode / f"{fmt}.safetensors", module, steps=0, format=fmt)
    for fmt in ("kohya", "diffusers"):
        with safe_open(files["null", fmt], "pt") as plain, safe_open(files["int8", fmt], "pt") as quant:
            assert sorted(plain.keys()) == sorted(quant.keys()) and len(plain.keys()) > 0
            for key in plain.keys():
                assert torch.equal(plain.get_tensor(key), quant.get_tensor(key)), key
            header, quant_header = plain.metadata(), quant.metadata()
        configs = [json.loads(h.pop("sdtune.config")) for h in (header, quant_header)]
        assert [c["model"].pop("quantize") for c in configs] == [None, "int8"]  # the run's config says it
        assert configs[0] == configs[1]
        assert header == quant_header and {"ss_network_dim", "ss_network_alpha"} <= set(header)
