"""Textual inversion and pivotal tuning (``embedding=ti|pivotal``) on the tiny random models.

Two short real runs are shared: SD1.5 textual inversion with two vectors per word and SDXL pivotal
tuning. Their ``<token>.safetensors`` files are loaded into fresh diffusers pipelines with
``load_textual_inversion`` and must give the prompt embeddings of the trained encoders, rebuilt
from the run's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.run.checks import validate
from sdtune.training.checkpointing import load_checkpoint
from sdtune.utils.errors import ConfigError, LoraFileError
from tests.helpers.cli import run_main
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.models import tiny_model

PROMPT = "a red circle on a olq background"
TI = ["embedding.tokens=[olq]", "embedding.init=red", "trainer.max_steps=3", "callbacks.samples=null",
      "data.val_images=0", "callbacks.model_checkpoint.every_n_train_steps=3"]
RUNS = {"sd15": ["model=tiny", "embedding=ti", "embedding.num_vectors=2", *TI],
        "sdxl": ["model=tiny_sdxl", "embedding=pivotal", *TI]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(family)``: the folder of that family's short embedding run (run once)."""
    import shutil

    from tests.helpers.paths import QUICKSTART

    data = tmp_path_factory.mktemp("data")
    shutil.copytree(QUICKSTART, data / "set")
    meta = data / "set" / "metadata.csv"
    meta.write_text(meta.read_text().replace(" sks ", " olq "))  # the captions name the new word
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            tiny_model(family)
            run = tmp_path_factory.mktemp(f"emb-{family}") / "run"
            capsys = _NoCapture()
            code, err = run_main(capsys, "experiment=quickstart", *RUNS[family], f"data.root={data / 'set'}",
                                 f"hydra.run.dir={run}")
            assert code == 0, err[-3000:]
            done[family] = run
        return done[family]

    return get


class _NoCapture:
    """run_main reads stderr through capsys; a module-scoped fixture has none, so report nothing."""

    def readouterr(self):
        return type("Captured", (), {"err": ""})()


def trained_module(run: Path):
    """The run's LightningModule rebuilt from its config, with the checkpoint's LoRA and new rows."""
    from omegaconf import OmegaConf

    from sdtune.training.module import LoRATrainingModule

    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    missing = module.load_state_dict(ckpt["state_dict"], strict=False)
    assert not missing.unexpected_keys
    module.eval()
    return module, ckpt


def test_sd15_textual_inversion_file_loads_in_diffusers_with_the_trained_embeddings(runs):
    """Catches: a wrong key or shape in the A1111 file, vectors not trained or in the wrong order, and
    captions expanded differently from diffusers' ``olq olq_1`` (num_vectors=2) in training."""
    from diffusers import StableDiffusionPipeline

    run = runs("sd15")
    tensors = load_file(str(run / "olq.safetensors"))
    assert list(tensors) == ["emb_params"] and tuple(tensors["emb_params"].shape) == (2, 32)
    assert not (run / "lora.safetensors").exists()  # textual inversion alone: no LoRA file
    module, ckpt = trained_module(run)
    # The checkpoint holds the new rows (2 vectors x 32) and no frozen encoder weight.
    rows = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("unet.")}
    assert {k: tuple(v.shape) for k, v in rows.items()} == {"embeddings.rows.0": (2, 32)}
    assert ckpt["sdtune"]["embedding"]["tokens"] == ["olq"]
    torch.testing.assert_close(rows["embeddings.rows.0"], tensors["emb_params"], rtol=0, atol=0)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model("sd15")), safety_checker=None)
    red = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("red", add_special_tokens=False).input_ids]
    assert (tensors["emb_params"] - red.mean(0)).abs().max() > 1e-3  # trained away from the init word
    pipe.load_textual_inversion(str(run / "olq.safetensors"), token="olq")
    ours = module.encode_text([PROMPT])["encoder_hidden_states"]
    theirs = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    plain = module.encode_text(["a red circle on a blue background"])["encoder_hidden_states"]
    torch.testing.assert_close(pipe.encode_prompt("a red circle on a blue background", "cpu", 1, False)[0], plain,
                               rtol=0, atol=1e-5)  # the old words are the base's


def test_sdxl_pivotal_file_loads_into_both_encoders_as_diffusers_documents(runs):
    """Catches: clip_l/clip_g swapped or missing, one encoder's vectors not trained, the LoRA not
    written or not trained beside the embeddings (pivotal tuning)."""
    from diffusers import StableDiffusionXLPipeline

    from sdtune.families import get_family
    from sdtune.families.base import ModelParts
    from sdtune.inference.embedding_files import EmbeddingRef, load_embeddings

    run = runs("sdxl")
    tensors = load_file(str(run / "olq.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    module, ckpt = trained_module(run)
    lora = [v for k, v in ckpt["state_dict"].items() if "lora_B" in k]
    assert lora and max(v.abs().max().item() for v in lora) > 0  # the LoRA trained too (B starts at zero)
    assert (run / "lora.safetensors").is_file()

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model("sdxl")))
    # As diffusers' docs load an SDXL embedding: clip_l into the first encoder, clip_g into the second.
    pipe.load_textual_inversion(tensors["clip_l"], token="olq", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="olq", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    ours = module.encode_text([PROMPT])
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, ours["encoder_hidden_states"], rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, ours["text_embeds"], rtol=0, atol=1e-4)

    # generate's loader does the same from the file.
    fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model("sdxl")))
    parts = ModelParts(denoiser=fresh.unet, vae=fresh.vae, text_encoders=[fresh.text_encoder, fresh.text_encoder_2],
                       tokenizers=[fresh.tokenizer, fresh.tokenizer_2], noise_scheduler=None, source="")
    load_embeddings(fresh, parts, get_family("sdxl"), [EmbeddingRef(str(run / "olq.safetensors"), "olq")])
    torch.testing.assert_close(fresh.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0],
                               ours["encoder_hidden_states"], rtol=0, atol=1e-4)


def test_generate_renders_with_the_run_embedding(runs, tmp_path):
    """Catches: ``embeddings=[...]`` ignored by generate (the image would equal the one without it)."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from sdtune.generate import generate
    from tests.helpers.paths import ROOT

    run = runs("sd15")
    images = {}
    for name, extra in (("with", [f"embeddings=[{run / 'olq.safetensors'}]"]), ("without", [])):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("generate", overrides=["model=tiny", f"prompt={PROMPT}", "num_images=1", "steps=2", *extra,
                                                  f"paths.output_dir={tmp_path}"])
        out = tmp_path / name
        out.mkdir()
        generate(cfg, out)
        images[name] = np.asarray(Image.open(out / "seed0.png"), dtype=np.float32)
        if name == "with":
            assert "olq.safetensors" in (out / "generation.json").read_text()
    assert np.abs(images["with"] - images["without"]).max() > 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=tiny_kolors", "embedding=ti", "embedding.tokens=[olq]", "embedding.init=red"],
     r"not supported for model.family=kolors.*ChatGLM.*Fix: set embedding=null"),
    (["model=tiny", "embedding=ti", "embedding.init=red"], r"embedding.tokens must name .*embedding.tokens=\[olq\]"),
    (["model=tiny", "embedding=ti", "embedding.tokens=[olq]"], r"embedding.init must be a word"),
    (["model=tiny", "embedding=ti", "embedding.tokens=[olq, olq]", "embedding.init=red"], r"lists a word twice"),
    (["model=tiny", "embedding=pivotal", "embedding.tokens=[olq]", "embedding.init=red", "embedding.num_vectors=0"],
     r"embedding.num_vectors must be an integer >= 1"),
    (["model=tiny", "embedding=ti", "embedding.tokens=[olq]", "embedding.init=red", "+embedding.vectors=2"],
     r"embedding.vectors is not a setting.*embedding.num_vectors"),
])
def test_bad_embedding_settings_are_refused_before_anything_loads(overrides, message):
    """Catches: Kolors silently training a token its pipeline cannot load, and typos or bad values
    in the embedding section passing unnoticed."""
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("experiment=quickstart", *overrides))


def test_pivotal_and_ti_presets_differ_only_in_with_lora():
    ti = resolved(compose_cfg("embedding=ti"))["embedding"]
    pivotal = resolved(compose_cfg("embedding=pivotal"))["embedding"]
    assert (ti["with_lora"], pivotal["with_lora"]) == (False, True)
    assert {**ti, "with_lora": True} == pivotal
    assert "embedding" not in resolved(compose_cfg())  # off unless asked for


def test_a_word_the_tokenizer_knows_is_refused(tmp_path):
    """Catches: an existing vocabulary word silently becoming a trained token (its meaning replaced everywhere)."""
    from sdtune.training.module import LoRATrainingModule

    cfg = resolved(compose_cfg("experiment=quickstart", "model=tiny", "embedding=ti", "embedding.tokens=['a</w>']",
                               "embedding.init=red", output_dir=tmp_path))
    tiny_model("sd15")
    with pytest.raises(ConfigError, match=r"'a</w>' is already a word of the sd15 tokenizer 1"):
        LoRATrainingModule(cfg).setup("fit")


def test_an_embedding_file_of_another_family_is_refused(runs, tmp_path):
    from sdtune.families import get_family
    from sdtune.inference.embedding_files import read_embedding

    with pytest.raises(LoraFileError, match=r"holds \['emb_params'\], but a sdxl embedding holds \['clip_l', 'clip_g'\]"):
        read_embedding(runs("sd15") / "olq.safetensors", get_family("sdxl"))
