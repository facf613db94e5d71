"""The FLUX.1 family on its tiny real-class model: text as FluxPipeline encodes it, the packed
transformer call, its pipelines, the full-size architecture on the meta device, and a training run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import FluxControlNetModel

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.families.flux import flux_t5_length
from sdtune.families.objectives import FlowMatchObjective
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.merge import merge
from sdtune.utils.errors import ConfigError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_tool
from tests.helpers.models import tiny_model

CAPTIONS = ["a red circle on a blue background", "a small orange cat sitting on a wooden table, high quality"]


@pytest.fixture(scope="module")
def flux():
    family = get_family("flux")
    return family, family.load(str(tiny_model("flux")))


def _pack(x: torch.Tensor) -> torch.Tensor:
    """2x2 patches as tokens, row-major over the patch grid, channels-major inside a token (BFL's rearrange)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def test_encoding_is_flux_pipelines_encode_prompt(flux):
    family, parts = flux
    tokens = family.tokenize(parts, CAPTIONS)
    assert {k: tuple(v.shape) for k, v in tokens.items()} == {"input_ids_0": (2, 77), "input_ids_1": (2, 32)}
    text = family.encode_tokens(parts, tokens)
    call = family.pipeline_call_kwargs(3.5, 0.5, parts)
    assert call == {"guidance_scale": 3.5, "joint_attention_kwargs": {"scale": 0.5}, "max_sequence_length": 32}
    context, pooled, txt_ids = family.build_pipeline(parts).encode_prompt(
        CAPTIONS, device=torch.device("cpu"), max_sequence_length=call["max_sequence_length"])
    assert torch.equal(text["encoder_hidden_states"], context) and context.shape == (2, 32, 32)
    assert torch.equal(text["pooled_projections"], pooled) and pooled.shape == (2, 32)
    assert family.conditioning(text, {}).keys() == {"encoder_hidden_states", "pooled_projections"}
    assert family.overlong_captions(parts, CAPTIONS) == CAPTIONS[1:]  # T5 (32 tokens here) truncates the long one


def test_predict_is_the_packed_transformer_call_unpacked(flux):
    """predict = FluxPipeline's transformer call on 2x2-packed latents (patch ids row by row, zero text ids,
    sigma as the timestep, the objective's guidance), unpacked: packing its output again gives the
    direct call's tokens. A non-square latent catches swapped sides."""
    family, parts = flux
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, 12, generator=g)
    text = {"encoder_hidden_states": torch.randn(2, 32, 32, generator=g), "pooled_projections": torch.randn(2, 32, generator=g)}
    objective = family.objective(parts, {"flow": {"guidance": 2.5}})
    assert isinstance(objective, FlowMatchObjective) and objective.guidance == 2.5
    cond = objective.conditioning(family.conditioning(text, {}), 2)
    sigma = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        pred = family.predict(parts.denoiser, noisy, objective.model_timestep(sigma), cond)
        img_ids = torch.tensor([[0.0, i, j] for i in range(4) for j in range(6)])
        direct = parts.denoiser(hidden_states=_pack(noisy), timestep=sigma, guidance=torch.full((2,), 2.5),
                                encoder_hidden_states=text["encoder_hidden_states"],
                                pooled_projections=text["pooled_projections"], txt_ids=torch.zeros(32, 3),
                                img_ids=img_ids, return_dict=False)[0]
        other_guidance = family.predict(parts.denoiser, noisy, sigma * 1000, {**cond, "guidance": torch.full((2,), 7.0)})
    assert pred.shape == noisy.shape
    assert torch.equal(_pack(pred), direct)
    assert (other_guidance - pred).abs().max() > 1e-4  # the guidance value reaches the transformer


@pytest.mark.parametrize("task", ["text2img", "img2img"])
def test_pipelines_render_a_64px_image(flux, task):
    family, parts = flux
    pipe = family.build_pipeline(parts, task=task)
    assert type(pipe).__name__ == {"text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline"}[task]
    assert pipe.transformer is parts.denoiser and pipe.scheduler is not parts.noise_scheduler
    extra = {"image": torch.full((1, 3, 64, 64), 0.5), "strength": 0.5} if task == "img2img" else {}
    with torch.no_grad():
        out = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0), **family.pipeline_call_kwargs(3.5, None, parts),
                   **extra).images
    assert out.shape == (1, 64, 64, 3) and bool((out >= 0).all() and (out <= 1).all()) and out.std() > 0


def test_controlnet_fit_and_schnell_settings(flux):
    family, parts = flux
    controlnet = FluxControlNetModel.from_transformer(parts.denoiser, num_layers=1, num_single_layers=0,
                                                      attention_head_dim=16, num_attention_heads=2)
    assert family.controlnet_fits(parts.denoiser.config, controlnet.config) == []
    wider = {**controlnet.config, "joint_attention_dim": 64, "guidance_embeds": False}
    assert family.controlnet_fits(parts.denoiser.config, wider) == ["joint_attention_dim"]
    # dev: 512 T5 tokens (capped by the tokenizer), trains at train.flow.guidance; schnell: 256, no guidance
    assert (flux_t5_length(True, 512), flux_t5_length(False, 512), flux_t5_length(True, 32), flux_t5_length(False, 512, 77)) \
        == (512, 256, 32, 77)
    assert family.training_guidance(parts, {"guidance": 1.0}) == 1.0
    short = replace(parts, extra={})
    family.configure_parts(short, {"max_sequence_length": 16})
    assert family.text_max_length(short) == 16 and family.tokenize(short, ["a"])["input_ids_1"].shape == (1, 16)
    with pytest.raises(ConfigError, match=r"model.max_sequence_length=600 .* Fix: e.g. model.max_sequence_length=512"):
        family.configure_parts(short, {"max_sequence_length": 600})
    schnell = replace(parts, denoiser=type(parts.denoiser).from_config({**parts.denoiser.config, "guidance_embeds": False}))
    assert family.training_guidance(schnell, {"guidance": 1.0}) is None
    assert family.objective(schnell, {"flow": {}}).conditioning({}, 2) == {}


def test_full_size_architecture_on_meta_has_the_published_sizes():
    from sdtune.families.arch import build_random_parts, parameter_count

    family = get_family("flux")
    parts = build_random_parts(family, device="meta")
    clip, t5 = parts.text_encoders
    assert round(parameter_count(parts.denoiser) / 1e9, 2) == 11.90  # published: 11.9 B
    assert round(parameter_count(t5) / 1e9, 3) == 4.762 and round(parameter_count(clip) / 1e6, 1) == 123.1
    assert round(parameter_count(parts.vae) / 1e6, 1) == 83.8 and parts.vae.config.latent_channels == 16
    # the 12 default targets, matched by suffix as peft and check_targets do: 342 Linear layers (19 double
    # blocks x 12 + 38 single blocks x 3, the single blocks' to_q/k/v)
    linears = [n for n, m in parts.denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = [n for n in linears if any(n.endswith("." + t) for t in family.default_lora_targets)]
    assert len(matched) == 19 * 12 + 38 * 3 == 342
    assert family.text_shapes({"transformer": parts.denoiser.config, "text_encoder": clip.config.to_dict(),
                               "text_encoder_2": t5.config.to_dict()}) == {
        "encoder_hidden_states": (512, 4096), "pooled_projections": (768,)}


@pytest.mark.slow  # a CLI run: ~20 s
def test_quickstart_trains_a_flux_lora(tmp_path):
    tiny_model("flux")
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=quickstart", "model=tiny_flux", "trainer.max_steps=4", "data.val_images=4",
                   "callbacks.concept_probe=null", "data.cache_latents=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = summary["final_metrics"]
    assert summary["global_step"] == 4 and all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train/loss", "val/loss"))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    ups = {k: v for k, v in state.items() if k.startswith("transformer.") and ".lora_B." in k}
    assert ups and all(v.abs().max() > 0 for v in ups.values())  # B starts at zero: every one has moved
    assert (run_dir / "samples.png").is_file()
    # merged into a diffusers folder (no single file: sdtune writes none for FLUX), it predicts as the
    # LoRA applied live does
    lora = str(run_dir / "lora.safetensors")
    folder, single = merge(compose_tool("merge", f"loras=[{lora}]", f"out={tmp_path / 'merged'}", "save_dtype=fp32"))
    assert single is None
    family, live = build_parts({"family": "flux", "path": str(tiny_model("flux"))})
    apply_loras(live, family, [LoraRef(lora)])
    merged = family.load(str(folder))
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 32, 32, generator=g), "pooled_projections": torch.randn(1, 32, generator=g),
            "guidance": torch.ones(1)}
    with torch.no_grad():
        expected = family.predict(live.denoiser, noisy, torch.tensor([500.0]), cond)
        base = family.predict(family.load(str(tiny_model("flux"))).denoiser, noisy, torch.tensor([500.0]), cond)
        assert (expected - base).abs().max() > 1e-4  # the trained LoRA moves the output 10x the tolerance
        torch.testing.assert_close(family.predict(merged.denoiser, noisy, torch.tensor([500.0]), cond), expected,
                                   rtol=0, atol=1e-5)


def test_text_encoder_lora_adapts_clip_and_never_t5():
    from sdtune.lora.layers import LoraSpec, trainable_lora_parameters
    from sdtune.training.text_encoders import inject_text_encoders, text_encoder_state

    family = get_family("flux")
    parts = family.load(str(tiny_model("flux")))
    inject_text_encoders(parts, LoraSpec(rank=2, alpha=2.0, targets=family.default_text_encoder_lora_targets), family)
    clip, t5 = parts.text_encoders
    assert len(trainable_lora_parameters(clip)) == 2 * 4 * 2 and trainable_lora_parameters(t5) == []
    assert not t5.training and list(text_encoder_state(parts, family)) == [0]


def test_generate_img2img_draws_at_the_init_pictures_size(tmp_path):
    """FluxImg2ImgPipeline resizes the init picture to 1024 px unless told the size: generate passes it."""
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from sdtune.generate import generate
    from tests.helpers.paths import QUICKSTART, ROOT

    tiny_model("flux")
    init = QUICKSTART / "images" / "sks_00_red_circle.png"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=["model=tiny_flux", "prompt=a red circle", "num_images=1", "steps=2",
                                             "device=cpu", f"init_image={init}", "strength=0.5"])
    written = generate(cfg, tmp_path)
    assert Image.open(tmp_path / "seed0.png").size == Image.open(init).size == (64, 64)
    assert tmp_path / "grid.png" in written


@pytest.mark.slow  # the full-size step on the meta device under the FLOP counter: ~10 s
def test_full_size_step_flops_on_meta():
    """One 1024 px FLUX.1-dev training step through the family's predict (4096 packed image tokens, 512 T5
    tokens, rank-16 LoRA on the 12 default targets), as the plan counted it with the transformer alone."""
    from sdtune.bench.flops import count_step_flops
    from sdtune.bench.runner import first_batch
    from sdtune.data.records import load_records
    from tests.helpers.config import bench_cfg

    cfg = bench_cfg("model=flux", "bench.random_init=true", "data.batch_size=1", "data.resolution=1024",
                    "lora.targets=null", "lora.rank=16", "lora.alpha=16", "trainer.precision=bf16-mixed")
    flops = count_step_flops(cfg, first_batch(cfg, load_records(cfg["data"]["root"])))
    assert flops["lora_params"] == 44_826_624
    assert (round(flops["fwd"] / 1e12, 1), round(flops["fwd_bwd"] / 1e12, 1)) == (74.6, 164.1)
