"""DoRA, LoHa and LoKr (``lora.use_dora``, ``lora.type``) on the tiny random models: names, files, maths.

Each adapter is injected by peft into a tiny SD1.5 UNet (attention linears and the 1x1 conv
``proj_in``) and given random weights, standing in for a trained one. Its kohya file must then
give, under a line-by-line re-implementation of ComfyUI's weight adapters
(``tests/helpers/comfyui.py``), the very weights peft merges; our own generate/merge path must
give the live model's outputs; diffusers must load the DoRA peft-layout file; and checkpoints
must keep all of the adapter's tensors and nothing else.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from sdtune.export import export_lora
from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.lora.adapters import kind_of
from sdtune.lora.apply import apply_lora, fuse
from sdtune.lora.files import LoraHeader, read_lora, save_lora
from sdtune.lora.layers import LoraSpec, inject, live_lora_state, lora_tensors, trainable_lora_parameters
from sdtune.run.checks import validate
from sdtune.training.checkpointing import keep_lora_only
from sdtune.utils.errors import ConfigError, LoraFileError
from tests.helpers.comfyui import merge_like_comfyui, unet_key_map
from tests.helpers.config import compose_cfg
from tests.helpers.models import tiny_model, unet_inputs

FAMILY = "sd15"
TARGETS = ("to_q", "to_v", "proj_in")  # proj_in is a 1x1 conv in the tiny SD1.5 UNet
# lokr rank 4 keeps lokr_w2 whole on the tiny 32/64-wide layers (r >= max(w2)/2), rank 2 splits it
VARIANTS = {
    "dora": dict(rank=4, type="lora", use_dora=True),
    "loha": dict(rank=4, type="loha"),
    "lokr_whole": dict(rank=4, type="lokr"),
    "lokr_split": dict(rank=2, type="lokr"),
}
FILE_MARK = {"dora": ".dora_scale", "loha": ".hada_w2_b", "lokr_whole": ".lokr_w2", "lokr_split": ".lokr_w2_a"}


def _parts(family: str = FAMILY):
    return build_parts({"family": family, "path": str(tiny_model(family))})[1]


def _trained(variant: str, seed: int = 0, family: str = FAMILY):
    """(parts, spec, peft tensors) of a UNet carrying ``variant`` with random (trained-like) weights."""
    parts = _parts(family)
    opts = VARIANTS[variant]
    spec = LoraSpec(opts["rank"], 3.0, TARGETS, type=opts["type"], use_dora=opts.get("use_dora", False))
    inject(parts.unet, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.unet):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    parts.unet.eval()
    return parts, spec, live_lora_state(parts.unet)


def _save(tmp_path, variant, parts, spec, tensors, fmt="kohya", family=FAMILY):
    from sdtune.lora.adapters import base_weights

    return save_lora(tmp_path / f"{variant}_{fmt}.safetensors", tensors, LoraHeader(spec, family), format=fmt,
                     base_weights=base_weights(parts.unet, tensors), denoiser_config=parts.unet.config)


def _peft_merged(unet) -> dict[str, torch.Tensor]:
    """Every adapted layer's weight as peft merges it (DoRA's magnitude and norm included)."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            out[name] = module.get_base_layer().weight.detach().clone()
    return out


@pytest.mark.parametrize(("variant", "family"), [*((v, FAMILY) for v in sorted(VARIANTS)), ("dora", "sdxl"), ("loha", "sdxl")])
def test_kohya_file_gives_peft_weights_under_comfyui_maths(variant, family, tmp_path):
    """Catches a wrong ``dora_scale`` (orientation, or ComfyUI's norm of the unpatched weight ignored),
    LoKr's alpha/r not baked where ComfyUI uses scale 1, and tensor names ComfyUI does not read
    (SDXL: kohya's SGM block names)."""
    parts, spec, tensors = _trained(variant, family=family)
    path = _save(tmp_path, variant, parts, spec, tensors, family=family)
    raw = load_file(str(path))
    assert any(k.endswith(FILE_MARK[variant]) for k in raw), sorted(raw)[:6]
    if family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in raw)  # SGM names, as kohya writes SDXL
    base_unet = _parts(family).unet
    base = {n: m.weight.detach().float() for n, m in base_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    comfy, not_loaded = merge_like_comfyui(raw, unet_key_map(base_unet), base)
    peft = _peft_merged(parts.unet)
    assert not_loaded == [], not_loaded[:3]
    assert comfy.keys() == peft.keys() and len(peft) >= 10
    worst = max((comfy[m] - peft[m]).abs().max().item() for m in peft)
    change = max((peft[m] - base[m]).abs().max().item() for m in peft)
    assert worst < 1e-4, f"ComfyUI's merge differs from peft's by {worst}"
    assert change > 1e-2  # the adapter changes the weights: the comparison is not vacuous


ROUND_TRIPS = [("dora", "kohya"), ("dora", "diffusers"), ("loha", "kohya"), ("lokr_whole", "kohya"), ("lokr_split", "kohya")]


@pytest.mark.parametrize(("variant", "fmt"), ROUND_TRIPS)
def test_own_file_applies_like_the_live_model(variant, fmt, tmp_path):
    """generate/merge's path (read_lora -> apply_lora -> fuse) must reproduce the live adapter's UNet
    output; catches a magnitude read back without undoing ComfyUI's norm, a LoKr scale rebuilt
    wrongly, and adapter layers that do not load (names, shapes)."""
    parts, spec, tensors = _trained(variant)
    path = _save(tmp_path, variant, parts, spec, tensors, fmt)
    lora = read_lora(path)
    assert lora.spec.kind == spec.kind and lora.spec.rank == spec.rank and lora.spec.alpha == spec.alpha
    x, t, kw = unet_inputs(FAMILY)
    with torch.no_grad():
        live = parts.unet(x, t, **kw).sample
        plain = _parts().unet(x, t, **kw).sample
    fresh = _parts()
    fresh.unet.eval()
    assert apply_lora(fresh, lora, family=FAMILY, path=path, adapter_name="a") == ["denoiser"]
    with torch.no_grad():
        applied = fresh.unet(x, t, **kw).sample
    fuse(fresh, {"denoiser": ["a"]})
    with torch.no_grad():
        fused = fresh.unet(x, t, **kw).sample
    assert (live - plain).abs().max() > 1e-2
    torch.testing.assert_close(applied, live, rtol=0, atol=1e-4)
    torch.testing.assert_close(fused, live, rtol=0, atol=1e-4)


def test_diffusers_loads_the_dora_file(tmp_path):
    """``--format diffusers`` for DoRA writes diffusers' peft layout with ``lora_magnitude_vector``,
    which ``load_lora_weights`` turns into a DoRA adapter; catches a file diffusers loads as plain
    LoRA (magnitudes dropped) or not at all."""
    parts, spec, tensors = _trained("dora")
    path = _save(tmp_path, "dora", parts, spec, tensors, "diffusers")
    assert any(k.startswith("unet.") and k.endswith(".lora_magnitude_vector") for k in load_file(str(path)))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model(FAMILY))
    pipe.load_lora_weights(str(path))
    x, t, kw = unet_inputs(FAMILY)
    with torch.no_grad():
        theirs = pipe.unet(x, t, **kw).sample
        ours = parts.unet(x, t, **kw).sample
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["dora", "loha", "lokr_split"])
def test_checkpoint_keeps_every_adapter_tensor_and_no_base_weight(variant):
    """Catches a checkpoint filter or trainable-parameter selection that knows only lora_A/lora_B
    (DoRA's magnitude, LoHa's hada_* and LoKr's lokr_* would be frozen, or dropped on save)."""
    parts, spec, live = _trained(variant)
    state = {f"unet.{k}": v for k, v in parts.unet.state_dict().items()}
    checkpoint = {"state_dict": dict(state)}
    keep_lora_only(checkpoint, spec)
    kept = checkpoint["state_dict"]
    assert not any(".base_layer." in k for k in kept)
    assert len(kept) == len(trainable_lora_parameters(parts.unet)) == len(live)
    back = lora_tensors(kept)
    assert back.keys() == live.keys() and all(torch.equal(back[k], live[k]) for k in live)
    assert kind_of(back) == spec.kind and checkpoint["sdtune"]["adapter"] == spec.kind


@pytest.mark.parametrize(("overrides", "message"), [
    (["lora.type=loha", "lora.use_dora=true"], "lora.use_dora=true works with lora.type=lora only"),
    (["lora.type=lokr", "lora.dropout=0.1"], "lora.dropout applies to lora.type=lora only"),
    (["lora.type=loha", "callbacks.lora_export.format=diffusers"], "callbacks.lora_export.format=diffusers cannot hold"),
    (["lora.type=boft"], "lora.type must be one of ['lora', 'loha', 'lokr']"),
    (["lora.use_dora=maybe"], "lora.use_dora must be true or false"),
])
def test_bad_combinations_are_refused_early(overrides, message):
    """Each bad combination is a ConfigError at validation that names the keys, before any model loads."""
    cfg = compose_cfg("experiment=quickstart", *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_layouts_we_cannot_write_or_apply_are_refused(tmp_path):
    """LoHa in the diffusers layout, a kohya DoRA without base weights, a Tucker LoHa, a per-input
    ``dora_scale`` and a file-to-file conversion of an adapter file are each refused by name."""
    parts, spec, tensors = _trained("loha")
    target = tmp_path / "loha_diffusers.safetensors"
    with pytest.raises(LoraFileError, match="diffusers' load_lora_weights cannot load"):
        save_lora(target, tensors, LoraHeader(spec, FAMILY), format="diffusers")
    assert not target.exists()
    with pytest.raises(LoraFileError, match="sdtune.export converts plain LoRA files only"):
        export_lora(_save(tmp_path, "loha", parts, spec, tensors), tmp_path / "again.safetensors", format="kohya")

    dparts, dspec, dtensors = _trained("dora")
    with pytest.raises(LoraFileError, match="needs the base model's weights"):
        save_lora(tmp_path / "d.safetensors", dtensors, LoraHeader(dspec, FAMILY), format="kohya")

    raw = load_file(str(_save(tmp_path, "loha", parts, spec, tensors)))
    stem = next(k for k in raw if k.endswith(".hada_w1_a"))[: -len(".hada_w1_a")]
    save_file({**raw, f"{stem}.hada_t1": torch.zeros(4, 4, 1, 1)}, str(tmp_path / "tucker.safetensors"))
    with pytest.raises(LoraFileError, match=r"LyCORIS LoHa with Tucker decomposition \(hada_t1\)"):
        read_lora(tmp_path / "tucker.safetensors")

    draw = load_file(str(_save(tmp_path, "dora", dparts, dspec, dtensors)))
    key = next(k for k in draw if k.endswith(".dora_scale") and "to_q" in k)
    width = draw[key.replace(".dora_scale", ".lora_down.weight")].shape[1]
    draw[key] = torch.ones(1, width + 1)  # kohya's per-input orientation (made non-square so it cannot pass as per-output)
    save_file(draw, str(tmp_path / "per_input.safetensors"))
    with pytest.raises(LoraFileError, match="per-input-feature DoRA"):
        apply_lora(_parts(), read_lora(tmp_path / "per_input.safetensors"), family=FAMILY, path="per_input", adapter_name="a")


def test_resume_refuses_a_checkpoint_of_another_adapter(tmp_path):
    """Lightning loads adapter tensors non-strictly, so a LoRA checkpoint resumed as a LoHa would
    silently start from scratch: the recorded adapter kind must be compared and named."""
    from sdtune.training.checkpointing import check_resumable

    cfg = compose_cfg("experiment=quickstart", "lora.type=loha")
    path = tmp_path / "last.ckpt"
    saved = {"family": "sd15", "rank": 4, "alpha": 4.0, "targets": sorted(get_family("sd15").default_lora_targets), "adapter": "dora"}
    torch.save({"sdtune": saved, "hyper_parameters": {}, "state_dict": {}}, path)
    with pytest.raises(ConfigError, match="adapter: checkpoint 'dora', config 'loha'"):
        check_resumable(path, cfg)
    torch.save({"sdtune": {**saved, "adapter": "loha"}, "hyper_parameters": {}, "state_dict": {}}, path)
    assert check_resumable(path, cfg)["sdtune"]["adapter"] == "loha"


@pytest.mark.parametrize("variant", ["loha", "lokr_whole"])
def test_weight_and_off_switch_act_on_lycoris_layers(variant, tmp_path):
    """``loras=[file@0.5]`` and ``compare=true`` go through diffusers' ``set_adapters`` and
    ``disable_adapters``, written for LoRA layers: a LoHa/LoKr file at weight 0.5 must add exactly
    half of peft's delta, and switched off must give the base model's output."""
    from sdtune.lora.apply import activate, set_enabled

    parts, spec, tensors = _trained(variant)
    path = _save(tmp_path, variant, parts, spec, tensors)
    fresh = _parts()
    fresh.unet.eval()
    apply_lora(fresh, read_lora(path), family=FAMILY, path=path, adapter_name="a")
    activate(fresh, {"denoiser": ["a"]}, {"a": 0.5})
    layers = [n for n, m in fresh.unet.named_modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) >= 10
    for name in layers:
        want = parts.unet.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(fresh.unet.get_submodule(name).get_delta_weight("a"), 0.5 * want, rtol=0, atol=1e-6)
    set_enabled(fresh, {"denoiser": ["a"]}, False)
    x, t, kw = unet_inputs(FAMILY)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t, **kw).sample, _parts().unet(x, t, **kw).sample, rtol=0, atol=0)
