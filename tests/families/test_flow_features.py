"""Existing features on a flow-matching family, end to end on the tiny SD3.5: one short training run
with text-encoder LoRA (both CLIPs train, T5 stays frozen), whose file then loads through sdtune's
apply and diffusers' ``load_lora_weights``, draws with ``generate`` (text2img, img2img, ControlNet)
and merges into a diffusers folder. Everything here is generic: FLUX gets it through its class
attributes (``lora_text_encoders``, ``controlnet_class``, ``pipeline_call_kwargs``...)."""

from __future__ import annotations

import pytest
import torch

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.lora.keys import DENOISER
from sdtune.training.checkpointing import load_checkpoint
from tests.helpers.cli import run_cli
from tests.helpers.models import tiny_model

pytestmark = pytest.mark.slow
PROMPTS = ["a red circle on a sks background"]


@pytest.fixture(scope="module")
def te_run(tmp_path_factory):
    """``python -m sdtune experiment=quickstart model=tiny_sd35 lora.text_encoder.rank=4``, 4 steps at a
    high learning rate (so that the LoRA visibly changes what the tiny model draws)."""
    run = tmp_path_factory.mktemp("sd35_te") / "run"
    proc = run_cli("experiment=quickstart", "model=tiny_sd35", "trainer.max_steps=4", "optim.optimizer.lr=0.05",
                   "callbacks.concept_probe=null", "callbacks.samples=null", "data.val_images=0",
                   "lora.text_encoder={rank: 4}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_text_encoder_lora_trains_both_clips_and_leaves_t5_frozen(te_run):
    from safetensors.torch import load_file

    state = load_checkpoint(te_run / "checkpoints" / "last.ckpt")["state_dict"]
    te = {k: v for k, v in state.items() if k.startswith("text_encoders.")}
    assert {k.split(".")[1] for k in te} == {"0", "1"}  # CLIP-L and CLIP-G; T5 (index 2) has no LoRA
    for index in ("0", "1"):  # each encoder's LoRA moved off its zero start (lora_B = 0)
        assert any(v.abs().max() > 0 for k, v in te.items() if k.startswith(f"text_encoders.{index}.") and ".lora_B." in k)
    on_disk = load_file(str(te_run / "lora.safetensors"))
    assert {k.split(".")[0] for k in on_disk} == {"transformer", "text_encoder", "text_encoder_2"}


def test_the_file_loads_through_sdtune_and_diffusers_alike(te_run):
    """diffusers' ``StableDiffusion3Pipeline.load_lora_weights`` puts the trained tensors into both CLIPs
    (and none into T5); sdtune's apply encodes the prompt exactly as that pipeline then does."""
    from diffusers import StableDiffusion3Pipeline

    path = str(te_run / "lora.safetensors")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd35"))
    pipe.load_lora_weights(path)
    state = load_checkpoint(te_run / "checkpoints" / "last.ckpt")["state_dict"]
    for index, name in ((0, "text_encoder"), (1, "text_encoder_2")):
        theirs = {k.replace(".default_0.", ".default."): v for k, v in getattr(pipe, name).named_parameters()
                  if ".lora_" in k}
        ours = {k.removeprefix(f"text_encoders.{index}."): v for k, v in state.items()
                if k.startswith(f"text_encoders.{index}.")}
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert not any(".lora_" in k for k, _ in pipe.text_encoder_3.named_parameters())

    family, parts = build_parts({"family": "sd35", "path": str(tiny_model("sd35"))})
    with torch.no_grad():
        base = family.encode_prompts(parts, PROMPTS)
        adapters = apply_loras(parts, family, [LoraRef(path, 1.0)])
        assert set(adapters) == {DENOISER, 0, 1}
        ours = family.encode_prompts(parts, PROMPTS)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False,
                                                  **{"max_sequence_length": family.t5_length(parts)})
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=1e-6)
    assert (ours["pooled_projections"] - base["pooled_projections"]).abs().max() > 1e-4  # the LoRA does act
    assert get_family("sd35").text_encoders_with_lora() == (0, 1)
