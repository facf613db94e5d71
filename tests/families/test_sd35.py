"""SD3.5 as a family: conditioning and prediction equal diffusers' own pipeline, op for op, on the
tiny model; its pipelines render; the full-size configs are the published models; a CLI run trains
every attention stream, MMDiT-X's attn2 included."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from sdtune.families import get_family
from sdtune.training.checkpointing import load_checkpoint
from sdtune.utils.errors import ConfigError
from tests.helpers.cli import run_main
from tests.helpers.models import tiny_model

CAPTIONS = ["a red circle on a sks background", "a photo of a green square", ""]


@pytest.fixture(scope="module")
def sd35():
    family = get_family("sd35")
    return family, family.load(str(tiny_model("sd35")))


@torch.no_grad()  # as the trainer encodes (and the pipeline: T5's attention kernel differs under autograd)
def test_encoding_is_the_pipelines_encode_prompt(sd35):
    family, parts = sd35
    tokens = family.tokenize(parts, CAPTIONS)
    assert {k: tuple(v.shape) for k, v in tokens.items()} == {"input_ids_0": (3, 77), "input_ids_1": (3, 77),
                                                              "input_ids_2": (3, 32)}  # T5: the tiny tokenizer's 32
    ours = family.encode_tokens(parts, tokens)
    pipe = family.build_pipeline(parts)
    kwargs = family.pipeline_call_kwargs(3.5, None, parts)
    assert kwargs == {"guidance_scale": 3.5, "max_sequence_length": 32}
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=kwargs["max_sequence_length"])
    assert ours["encoder_hidden_states"].shape == (3, 77 + 32, 96) and ours["pooled_projections"].shape == (3, 32 + 48)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["pooled_projections"], pooled)
    # the CLIP features (32 + 48) are zero-padded to T5's 96 on the first 77 tokens
    assert ours["encoder_hidden_states"][:, :77, 80:].abs().max() == 0
    assert ours["encoder_hidden_states"][:, 77:, 80:].abs().max() > 0


def test_predict_is_the_pipelines_transformer_call(sd35):
    """One 64 px pipeline step records the transformer's inputs and output; predict, fed the
    objective's timestep for the pipeline's first sigma and our own conditioning, gives the same
    tensor exactly."""
    family, parts = sd35
    pipe = family.build_pipeline(parts)
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(kwargs, out=output[0])

    handle = parts.denoiser.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(CAPTIONS[0], num_inference_steps=1, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(0), **family.pipeline_call_kwargs(1.0, None, parts))
    finally:
        handle.remove()
    objective = family.objective(parts, {"flow": {}})
    sigma = pipe.scheduler.sigmas[:1]
    assert torch.equal(objective.model_timestep(sigma), seen["timestep"])  # σ·1000, the pipeline's scale
    with torch.no_grad():
        cond = family.conditioning(family.encode_prompts(parts, CAPTIONS[:1]), {})
        pred = family.predict(parts.denoiser, seen["hidden_states"], objective.model_timestep(sigma),
                              objective.conditioning(cond, 1))
    assert pred.shape == (1, 16, 8, 8) and torch.equal(pred, seen["out"])


def test_text2img_and_img2img_render_64px_and_the_controlnet_pipeline_runs(sd35):
    from diffusers import SD3ControlNetModel

    family, parts = sd35
    call = {"num_inference_steps": 1, "generator": torch.Generator().manual_seed(0),
            **family.pipeline_call_kwargs(2.0, None, parts)}
    text2img = family.build_pipeline(parts)(CAPTIONS[0], height=64, width=64, **call).images[0]
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    img2img = family.build_pipeline(parts, task="img2img")
    assert type(img2img).__name__ == "StableDiffusion3Img2ImgPipeline" and img2img.transformer is parts.denoiser
    redrawn = img2img(CAPTIONS[0], image=init, strength=0.5, **call).images[0]
    controlnet = SD3ControlNetModel.from_transformer(parts.denoiser, num_layers=1, num_extra_conditioning_channels=0)
    assert family.controlnet_fits(parts.denoiser.config, controlnet.config) == []
    controlled = family.build_pipeline(parts, controlnet=controlnet)(
        CAPTIONS[0], control_image=init, height=64, width=64, output_type="latent", **call).images
    assert text2img.size == redrawn.size == (64, 64) and controlled.shape == (1, 16, 8, 8)
    with pytest.raises(ConfigError, match="no diffusers pipeline for img2img with a ControlNet"):
        family.build_pipeline(parts, task="img2img", controlnet=controlnet)
    wider = {**controlnet.config, "num_attention_heads": 4}
    assert family.controlnet_fits(parts.denoiser.config, wider) == ["num_attention_heads"]


def test_tiny_has_mmdit_x_dual_attention_and_a_context_pre_only_last_block(sd35):
    """Both block kinds of the full-size models, and the default targets reach attn2 and both streams."""
    family, parts = sd35
    blocks = parts.denoiser.transformer_blocks
    assert list(parts.denoiser.config.dual_attention_layers) == [0] and blocks[0].attn2 is not None
    assert blocks[-1].context_pre_only and blocks[-1].attn.to_add_out is None
    targets = family.default_lora_targets
    matched = [n for n, m in parts.denoiser.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)]
    # block 0: 8 joint-attention projections + attn2's 4; the last block has no to_add_out
    assert len(matched) == 12 + 7 and "transformer_blocks.0.attn2.to_out.0" in matched
    assert family.lora_text_encoders == (0, 1) and family.text_encoder_kinds[2] == "t5"


@pytest.mark.parametrize(("variant", "params", "buffers", "published", "linears"), [
    (None, 8_056_627_520, 89_653_248, 8.1e9, 303),       # SD3.5 Large: 38 blocks, 38 x 64
    ("medium", 2_243_171_520, 226_492_416, 2.5e9, 243),  # Medium: 24 blocks, 1536 wide, attn2 in 0-12
])
def test_full_size_transformers_are_the_published_models(variant, params, buffers, published, linears):
    """Built on the meta device from the shipped configs: parameters plus the fixed sin-cos
    position table (a buffer) come to the published size."""
    from diffusers import SD3Transformer2DModel

    from sdtune.families.arch import architecture

    arch = architecture("sd35", variant=variant)
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(arch["transformer"])
    count = sum(p.numel() for p in model.parameters())
    table = sum(b.numel() for b in model.buffers())
    side, width = arch["transformer"]["pos_embed_max_size"], arch["transformer"]["caption_projection_dim"]
    assert (count, table) == (params, buffers) and table == side * side * width
    assert math.isclose(count + table, published, rel_tol=0.02)
    targets = get_family("sd35").default_lora_targets
    matched = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)]
    assert len(matched) == linears


@pytest.mark.slow
def test_cli_run_trains_every_attention_stream(capsys, tmp_path):
    """``python -m sdtune experiment=quickstart model=tiny_sd35``: cached text and latents, buckets,
    validation, the sample grid; each default target's LoRA moved off its zero start (B = 0), attn2's too."""
    run = tmp_path / "run"
    code, err = run_main(capsys, "experiment=quickstart", "model=tiny_sd35", "lora.targets=null", "trainer.max_steps=3",
                         "data.cache_latents=true", "trainer.log_every_n_steps=1", "callbacks.concept_probe=null",
                         f"data.latent_cache_dir={tmp_path / 'latents'}", f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    assert (run / "samples.png").is_file() and (run / "lora.safetensors").is_file()
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    ups = {k.removeprefix("transformer.").split(".lora_B.")[0]: v for k, v in state.items()
           if k.startswith("transformer.") and ".lora_B." in k}
    # The last block is context_pre_only: its text-stream queries feed nothing, so add_q_proj gets no gradient.
    dead = "transformer_blocks.1.attn.add_q_proj"
    assert len(ups) == 19 and ups[dead].abs().max() == 0
    assert all(v.abs().max() > 0 for k, v in ups.items() if k != dead)
    assert "transformer_blocks.0.attn2.to_q" in ups and "transformer_blocks.1.attn.add_k_proj" in ups
    rows = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index(name)]) for r in rows[1:] for name in ("train/loss_step", "val/loss")
              if r.split(",")[header.index(name)]]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
