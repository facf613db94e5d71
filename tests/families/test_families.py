"""The UNet families behind one interface, on their tiny real-architecture models."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sdtune.data.collate import collate
from sdtune.data.datamodule import ImageCaptionDataset
from sdtune.data.records import load_records
from sdtune.families import FAMILIES, get_family
from sdtune.lora.apply import apply_lora
from sdtune.lora.files import LoraHeader, read_lora, save_lora
from sdtune.lora.layers import LoraSpec, inject, lora_tensors, trainable_lora_parameters
from sdtune.utils.errors import LoraFileError
from tests.helpers.models import tiny_model, unet_inputs

FAMILY_NAMES = ["sd15", "sdxl", "kolors"]  # the UNet families; FLUX has tests/families/test_flux.py
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "kolors": "KolorsPipeline"}


def test_registry_and_defaults():
    assert sorted(FAMILIES) == sorted([*FAMILY_NAMES, "flux", "sd35"])  # the UNet families here; test_flux.py, test_sd35.py
    assert {n: get_family(n).default_resolution for n in FAMILIES} == {"sd15": 512, "sdxl": 1024, "kolors": 1024,
                                                                       "flux": 1024, "sd35": 1024}
    for n in FAMILY_NAMES:
        assert get_family(n).default_lora_targets == ("to_q", "to_k", "to_v", "to_out.0")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_family_loads_encodes_conditions_and_samples(name):
    family = get_family(name)
    parts = family.load(str(tiny_model(name)))
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        assert all(torch.isfinite(p).all() for p in module.parameters()), type(module).__name__
    text = family.encode_prompts(parts, ["a red circle", "二次元，一个紫色短发小女孩"])
    assert torch.isfinite(text["encoder_hidden_states"]).all()
    assert not torch.allclose(text["encoder_hidden_states"][0], text["encoder_hidden_states"][1])
    batch = {k: torch.tensor([[64, 64], [64, 64]]) for k in ("original_size", "crop_top_left", "target_size")}
    out = parts.unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), **family.conditioning(text, batch)).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    pipe = family.build_pipeline(parts)
    assert type(pipe).__name__ == PIPELINES[name]
    assert pipe.unet is parts.unet  # shares, does not copy


def test_sdxl_time_ids_are_each_samples_geometry(tmp_path):
    Image.new("RGB", (100, 80), (9, 9, 9)).save(tmp_path / "wide.png")
    Image.new("RGB", (48, 96), (9, 9, 9)).save(tmp_path / "tall.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\nwide.png,a\ntall.png,b\n")
    ds = ImageCaptionDataset(load_records(tmp_path), 64)
    batch = collate([ds[0], ds[1]])
    family = get_family("sdxl")
    parts = family.load(str(tiny_model("sdxl")))
    kwargs = family.conditioning(family.encode_prompts(parts, batch["text"]), batch)
    time_ids = kwargs["added_cond_kwargs"]["time_ids"]
    # wide 100x80 -> scaled to 80x64, centre crop left (80-64)//2 = 8; tall 48x96 -> 64x128, top 32
    assert time_ids.tolist() == [[80, 100, 0, 8, 64, 64], [96, 48, 32, 0, 64, 64]]
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 48)
    assert kwargs["encoder_hidden_states"].shape == (2, 77, 80)  # 32 + 48 from both encoders


def test_kolors_encodes_chinese_captions_to_the_shapes_the_unet_expects():
    family = get_family("kolors")
    parts = family.load(str(tiny_model("kolors")))
    caption = "二次元，一个紫色短发小女孩"
    ids = parts.tokenizers[0](caption)["input_ids"]
    unk = parts.tokenizers[0].tokenizer.sp_model.unk_id()
    assert sum(i == unk for i in ids) == 0  # every character is in the vocabulary
    text = family.encode_prompts(parts, [caption])
    hidden = parts.text_encoders[0].config.hidden_size
    assert text["encoder_hidden_states"].shape == (1, 256, hidden)
    assert text["text_embeds"].shape == (1, hidden)
    unet = parts.unet.config
    assert unet.encoder_hid_dim == hidden and unet.encoder_hid_dim_type == "text_proj"
    assert unet.projection_class_embeddings_input_dim == hidden + 6 * unet.addition_time_embed_dim
    # a prompt longer than 256 tokens is truncated to the model's length, not rejected
    long = family.encode_prompts(parts, [caption * 60])
    assert long["encoder_hidden_states"].shape == (1, 256, hidden)


def _trained_unet(name: str) -> tuple[torch.nn.Module, LoraSpec]:
    """A tiny UNet of ``name`` with peft LoRA layers (alpha 4, rank 2: scale 2) holding fixed random
    weights, standing in for a trained one; the same weights on every call."""
    parts = get_family(name).load(str(tiny_model(name)))
    spec = LoraSpec(rank=2, alpha=4.0, targets=("to_q", "to_k", "to_v", "to_out.0"))
    inject(parts.unet, spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.unet):
            p.normal_(std=0.1)
    return parts.unet, spec


def _lora_for(name: str, tmp_path, *, with_family: bool = True, trained: tuple | None = None):
    """The LoRA file of ``trained`` (default: a fresh ``_trained_unet(name)``), saved in the diffusers layout."""
    unet, spec = trained or _trained_unet(name)
    wrapper = torch.nn.Module()
    wrapper.unet = unet
    header = LoraHeader(spec, family=name, base_model="tiny", base_model_version="x", resolution=64)
    path = save_lora(tmp_path / f"{name}.safetensors", lora_tensors(wrapper.state_dict()), header, format="diffusers")
    if not with_family:  # as another trainer writes it: diffusers' header, none of ours
        from safetensors.torch import load_file, save_file

        meta = {k: v for k, v in header.metadata("diffusers").items() if not k.startswith("sdtune.")}
        save_file(load_file(str(path)), str(path), metadata=meta)
    return path


def test_lora_into_the_wrong_family_names_both(tmp_path):
    path = _lora_for("sd15", tmp_path)
    sdxl = get_family("sdxl").load(str(tiny_model("sdxl")))
    with pytest.raises(LoraFileError, match=r"is a sd15 LoRA but the base model is sdxl"):
        apply_lora(sdxl, read_lora(path), family="sdxl", path=path, adapter_name="x")
    assert not getattr(sdxl.unet, "peft_config", None) or "x" not in sdxl.unet.peft_config


def test_headerless_mismatch_is_a_fit_error_not_a_family_error(tmp_path):
    path = _lora_for("sd15", tmp_path, with_family=False)
    sdxl = get_family("sdxl").load(str(tiny_model("sdxl")))
    with pytest.raises(LoraFileError, match=r"does not (fit|match) this sdxl UNet") as err:
        apply_lora(sdxl, read_lora(path), family="sdxl", path=path, adapter_name="x")
    assert "sd15 LoRA" not in str(err.value)


def test_apply_lora_reproduces_the_trained_unet(tmp_path):
    """The saved file applied to a fresh base gives the trained (peft) UNet's own output: every
    layer found, at scale alpha/rank and weight 1. A wrong scale (alpha/rank twice, a weight of 0.5)
    or a layer left out moves the output by far more than the tolerance."""
    trained, spec = _trained_unet("kolors")
    path = _lora_for("kolors", tmp_path, trained=(trained, spec))
    parts = get_family("kolors").load(str(tiny_model("kolors")))
    x, t, kw = unet_inputs("kolors")
    with torch.no_grad():
        base = parts.unet(x, t, **kw).sample
        expected = trained(x, t, **kw).sample
        apply_lora(parts, read_lora(path), family="kolors", path=path, adapter_name="mine")
        with_lora = parts.unet(x, t, **kw).sample
    effect = (expected - base).abs().max().item()
    assert effect > 1e-2  # the LoRA moves the output 1000x the tolerance: a wrong scale cannot hide in it
    torch.testing.assert_close(with_lora, expected, rtol=0, atol=1e-5)


def test_sdxl_separate_vae_path_replaces_the_bundled_vae(tmp_path):
    from sdtune.families.tiny_parts import tiny_vae

    torch.manual_seed(123)
    other = tiny_vae()
    other.save_pretrained(tmp_path / "fp16-fix-vae")
    parts = get_family("sdxl").load(str(tiny_model("sdxl")), vae_path=str(tmp_path / "fp16-fix-vae"))
    for k, v in other.state_dict().items():
        assert torch.equal(parts.vae.state_dict()[k], v)
    bundled = get_family("sdxl").load(str(tiny_model("sdxl"))).vae.state_dict()
    assert any(not torch.equal(bundled[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tokenize_then_encode_is_the_pipelines_encoding_and_token_rows_can_be_cached(name):
    """encode_prompts = encode_tokens(tokenize(...)) gives what the family's diffusers pipeline
    encodes; ids cached per caption (TokenCache) stack to exactly the batch's ids, so the trainer's
    tokenize-once path gives identical embeddings."""
    from sdtune.data.text_cache import TokenCache

    family = get_family(name)
    parts = family.load(str(tiny_model(name)))
    captions = ["a red circle", "二次元，一个紫色短发小女孩", "a red circle"]
    direct = family.encode_prompts(parts, captions)
    out = family.build_pipeline(parts).encode_prompt(captions, device=torch.device("cpu"), num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    torch.testing.assert_close(direct["encoder_hidden_states"], out[0])
    if "text_embeds" in direct:
        torch.testing.assert_close(direct["text_embeds"], out[2])
    memo = TokenCache(lambda texts: family.tokenize(parts, texts), limit=2)
    memo(captions[1:2])  # a caption tokenized alone, before the batch
    ids = memo(captions)
    assert memo.tokenized == 2 and list(memo.ids) == [captions[1], captions[0]]  # each caption once
    batch_ids = family.tokenize(parts, captions)
    assert ids.keys() == batch_ids.keys() and all(torch.equal(ids[k], v) for k, v in batch_ids.items())
    encoded = family.encode_tokens(parts, ids)
    assert all(torch.equal(encoded[k], v) for k, v in direct.items())
    memo(["a blue square"])  # past the limit the oldest caption is forgotten
    assert list(memo.ids) == [captions[0], "a blue square"] and memo.tokenized == 3
