"""Text-encoder LoRA (``lora.text_encoder``) on the tiny SD1.5, SDXL and Kolors: what trains, what
a checkpoint keeps, and what the exported files hold when diffusers, ComfyUI and sdtune load them.

The round trip: a module built in-process with random (non-zero) LoRA weights on the UNet and on
every text encoder is checkpointed the way a run does, exported in both layouts by
``sdtune.export``, and each file is loaded by diffusers' ``load_lora_weights`` (the layouts it
reads) and by sdtune's own generate path; text-encoder and UNet outputs must equal the live model's.
"""

from __future__ import annotations

import pytest
import torch

from sdtune.families import ModelParts, get_family
from sdtune.families.builder import build_parts
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.lora.files import read_lora
from sdtune.lora.keys import te_live_module
from sdtune.training.module import LoRATrainingModule
from sdtune.utils.errors import ConfigError, LoraFileError
from tests.helpers.comfyui import clip_key_map, load_clip_like_comfyui
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.models import tiny_model, unet_inputs

MODEL = {"sd15": "tiny", "sdxl": "tiny_sdxl", "kolors": "tiny_kolors"}
PIPELINE = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "kolors": "KolorsPipeline"}
TE = "lora.text_encoder={rank: 2, alpha: 6, targets: null, lr: 1e-3}"
CAPTIONS = ["a red circle on a blue background", "a sks square"]
TOL = 1e-4


def te_module(tmp_path, family: str, *overrides: str) -> LoRATrainingModule:
    cfg = compose_cfg("experiment=quickstart", f"model={MODEL[family]}", TE, *overrides, output_dir=tmp_path)
    module = LoRATrainingModule(resolved(cfg))
    module.setup("fit")
    return module


def randomise_lora(module: LoRATrainingModule, seed: int = 0) -> None:
    """Non-zero LoRA weights everywhere (B starts at 0, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def outputs(parts: ModelParts, family: str) -> dict[str, torch.Tensor]:
    """Text-encoder outputs for CAPTIONS and the UNet's output on fixed inputs."""
    fam = get_family(family)
    with torch.no_grad():
        text = fam.encode_prompts(parts, CAPTIONS)
        sample, timesteps, kwargs = unet_inputs(family)
        return {**{f"text/{k}": v for k, v in text.items()}, "unet": parts.unet(sample, timesteps, **kwargs).sample}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def checkpoint_of(module: LoRATrainingModule, path) -> None:
    """What Lightning writes for this module: its state dict, shrunk by the module's own on_save_checkpoint."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": {"cfg": module.cfg}, "global_step": 7}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return ckpt


@pytest.fixture(scope="module", params=list(MODEL))
def exported(request, tmp_path_factory):
    """(family, live outputs, {layout: exported file}, checkpoint dict) for a module with TE LoRA."""
    from sdtune.export import export_checkpoint

    family = request.param
    tmp = tmp_path_factory.mktemp(f"te-{family}")
    module = te_module(tmp, family)
    randomise_lora(module)
    module.eval()
    live = outputs(module.parts, family)
    ckpt = checkpoint_of(module, tmp / "last.ckpt")
    files = {fmt: export_checkpoint(tmp / "last.ckpt", tmp / f"{fmt}.safetensors", format=fmt) for fmt in ("diffusers", "kohya")}
    return family, live, files, ckpt, module


def test_checkpoint_keeps_text_encoder_lora_and_no_frozen_weight(exported):
    """Catches text-encoder LoRA tensors dropped from checkpoints (a resume would restart them from
    scratch) and frozen encoder weights kept in them."""
    family, _, _, ckpt, module = exported
    keys = ckpt["state_dict"].keys()
    te_keys = [k for k in keys if k.startswith("text_encoders.")]
    count = len(get_family(family).text_encoder_kinds)
    assert {int(k.split(".")[1]) for k in te_keys} == set(range(count))
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert ckpt["sdtune"]["text_encoder"] == {"rank": 2, "alpha": 6.0,
                                              "targets": list(get_family(family).default_text_encoder_lora_targets)}
    lora_params = sum(p.numel() for n, p in module.named_parameters() if n.startswith("text_encoders.") and ".lora_" in n)
    assert sum(ckpt["state_dict"][k].numel() for k in te_keys) == lora_params > 0


def test_exported_files_load_in_sdtune_generate_like_the_live_model(exported):
    """Both layouts, applied by sdtune's generate/merge path to a fresh base, reproduce the live
    model's text-encoder and UNet outputs (catches wrong names, lost layers, wrong TE alpha)."""
    family, live, files, _, _ = exported
    for fmt, path in files.items():
        lora = read_lora(path)
        assert lora.format == fmt and (lora.text_encoder.rank, lora.text_encoder.alpha) == (2, 6.0)
        parts = build_parts({"family": family, "path": str(tiny_model(family))})[1]
        base = outputs(parts, family)
        assert max_diff(base, live) > 1e-2  # the LoRA changes both the text and the UNet output
        apply_loras(parts, get_family(family), [LoraRef(str(path))])
        got = outputs(parts, family)
        assert max_diff(got, live) < TOL, fmt


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_files_load_in_diffusers_load_lora_weights(exported, fmt):
    """diffusers' own loader reads the text-encoder layers of both layouts (Kolors: diffusers
    layout only; diffusers' kohya converter has no ChatGLM names) and gets the live outputs."""
    import diffusers

    family, live, files, _, _ = exported
    if family == "kolors" and fmt == "kohya":
        pytest.skip("diffusers converts kohya text-encoder names for CLIP only; sdtune's generate reads this file")
    pipe = getattr(diffusers, PIPELINE[family]).from_pretrained(str(tiny_model(family)), dtype=torch.float32)
    pipe.load_lora_weights(str(files[fmt]))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) is not None else [])
    parts = ModelParts(denoiser=pipe.unet, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers, noise_scheduler=None, source="")
    for encoder in encoders:
        assert any("lora_A" in n for n, _ in encoder.named_modules())
    assert max_diff(outputs(parts, family), live) < TOL


def test_kohya_text_encoder_names_are_the_ones_comfyui_reads(exported):
    """Every lora_te* key of the kohya file is one ComfyUI's model_lora_keys_clip maps, onto the
    layer it came from, with the live delta alpha/rank * B @ A (Kolors: ComfyUI has no ChatGLM map)."""
    family, _, files, _, module = exported
    if family == "kolors":
        pytest.skip("ComfyUI's key map has no ChatGLM entries")
    from safetensors.torch import load_file

    raw = load_file(str(files["kohya"]))
    deltas, not_loaded = load_clip_like_comfyui(raw, clip_key_map(module.parts.text_encoders))
    assert not_loaded == []
    assert len(deltas) == sum(1 for k in raw if k.startswith("lora_te") and k.endswith("lora_down.weight")) > 0
    for (index, layer), delta in deltas.items():
        encoder = module.parts.text_encoders[index]
        live = encoder.get_submodule(te_live_module(layer, encoder))
        expected = live.scaling["default"] * (live.lora_B["default"].weight @ live.lora_A["default"].weight)
        assert torch.allclose(delta, expected.detach(), atol=1e-6), layer


def test_reexport_converts_the_text_encoder_layers_both_ways(exported, tmp_path):
    """sdtune.export on its own file: diffusers -> kohya -> diffusers keeps every text-encoder
    tensor bit for bit (it refused text-encoder files before)."""
    from safetensors.torch import load_file

    from sdtune.export import export_lora

    family, _, files, _, _ = exported
    kohya = export_lora(files["diffusers"], tmp_path / "k.safetensors", format="kohya")
    back = export_lora(kohya, tmp_path / "d.safetensors", format="diffusers")
    a, b = load_file(str(files["diffusers"])), load_file(str(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    k1, k2 = load_file(str(files["kohya"])), load_file(str(kohya))
    assert k1.keys() == k2.keys() and all(torch.equal(k1[k], k2[k]) for k in k1)


def test_text_encoder_lora_trains_with_gradients_and_its_own_lr(tmp_path):
    """Catches encoders left under no_grad (their LoRA would never change) and a param group that
    ignores lora.text_encoder.lr: one step moves the TE LoRA, and the group holds exactly those params."""
    module = te_module(tmp_path, "sd15", "optim.optimizer.lr=1e-4")
    randomise_lora(module)
    text = module.encode_text(CAPTIONS)
    assert text["encoder_hidden_states"].requires_grad
    text["encoder_hidden_states"].square().mean().backward()
    te_params = [p for n, p in module.named_parameters() if n.startswith("text_encoders.") and ".lora_" in n]
    assert te_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in te_params)

    class _Trainer:
        estimated_stepping_batches = 10

    module.trainer = _Trainer()  # configure_optimizers reads only the step count
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == [1e-4, 1e-3]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in te_params}


@pytest.mark.parametrize(("value", "message"), [
    ("{alpha: 4}", "lora.text_encoder has no rank"),
    ("{rank: 0}", r"lora.text_encoder.rank must be >= 1"),
    ("{rank: 4, lr: -1}", r"lora.text_encoder.lr must be > 0"),
    ("{rank: 4, rnak: 4}", r"lora.text_encoder.rnak is not a setting"),
    ("{rank: 4, targets: []}", r"lora.text_encoder.targets must be null"),
    ("4", r"lora.text_encoder must be a mapping"),
])
def test_bad_text_encoder_settings_are_refused_early(value, message):
    from sdtune.run.checks import validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("experiment=quickstart", f"lora.text_encoder={value}"))


def test_unet_lr_zero_needs_a_text_encoder_lr():
    from sdtune.run.checks import validate

    validate(compose_cfg("experiment=quickstart", "optim.optimizer.lr=0", "lora.text_encoder={rank: 4, lr: 1e-3}"))
    with pytest.raises(ConfigError, match="optim.optimizer.lr must be > 0"):
        validate(compose_cfg("experiment=quickstart", "optim.optimizer.lr=0", "lora.text_encoder={rank: 4}"))


def test_targets_matching_no_text_encoder_layer_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.text_encoder.targets: \['to_q'\] match no linear layer of the kolors "
                                          r"text encoder 1 \(ChatGLMModel\).*query_key_value"):
        te_module(tmp_path, "kolors", "lora.text_encoder={rank: 2, targets: [to_q]}")


def test_export_still_refuses_a_file_whose_text_encoder_tensors_contradict_its_header(exported, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sdtune.export import export_lora

    family, _, files, _, _ = exported
    raw = load_file(str(files["kohya"]))
    with safe_open(str(files["kohya"]), "pt") as fh:
        meta = fh.metadata()
    key = next(k for k in raw if k.startswith("lora_te") and k.endswith(".alpha"))
    raw[key] = torch.tensor(1.0)
    save_file(raw, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(LoraFileError, match=r"contradicts the header's sdtune.text_encoder \(rank 2, alpha 6.0\)"):
        export_lora(tmp_path / "edited.safetensors", tmp_path / "out.safetensors", format="diffusers")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("family", ["sd15", "kolors"])
def test_gradient_checkpointing_of_the_text_encoder_gives_the_same_gradients(tmp_path, family):
    """train.gradient_checkpointing also checkpoints the training text encoders (CLIP, ChatGLM):
    the same loss and gradients, so it only trades time for memory (catches a checkpointed encoder
    that drops the LoRA's gradients, as a reentrant checkpoint over frozen inputs does)."""
    grads = []
    for on in (False, True):
        module = te_module(tmp_path, family, f"train.gradient_checkpointing={str(on).lower()}")
        randomise_lora(module)
        encoder = module.parts.text_encoders[0]
        assert any(getattr(m, "gradient_checkpointing", False) for m in encoder.modules()) == on
        module.encode_text(CAPTIONS)["encoder_hidden_states"].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if n.startswith("text_encoders.") and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
