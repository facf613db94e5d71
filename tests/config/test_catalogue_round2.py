"""Catalogue round 2, config (issue 25): documented keys as dotted overrides, sizes bounded by what they
can mean, our message instead of a raw traceback, and every check before the model loads.

Runs that must stop before loading patch sdtune's own model loader (``sdtune.training.module.build_parts``) to
fail loudly, so a check that only fires after the load fails the test instead of training."""

from __future__ import annotations

import importlib.util
import re

import pytest
from omegaconf import OmegaConf

from tests.helpers.cli import run_main
from tests.helpers.config import compose_cfg
from tests.helpers.files import snapshot
from tests.helpers.paths import QUICKSTART

BASE = ["experiment=quickstart", "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0",
        "trainer.max_steps=1"]
TI = ["embedding=ti", "embedding.tokens=[olq]", "embedding.init=blue"]


class ModelLoaded(Exception):
    """Raised by the patched loader: the run got past every check and began loading the base."""


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded("the base model was loaded before the settings were refused")

    monkeypatch.setattr("sdtune.training.module.build_parts", refuse)


def _refused(capsys, tmp_path, overrides, message):
    before = snapshot(QUICKSTART)
    code, err = run_main(capsys, *BASE, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err[-3000:]
    assert re.search(message, err), err[-3000:]
    assert "Traceback" not in err and "ModelLoaded" not in err and "is not in struct" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert snapshot(QUICKSTART) == before
    return err


# -- 1. documented keys of sections that are off by default work as dotted overrides ------------------
@pytest.mark.parametrize(("overrides", "expected"), [
    (["lora.text_encoder.rank=4"], {"lora.text_encoder": {"rank": 4, "alpha": None, "targets": None, "lr": None}}),
    (["lora.text_encoder.rank=2", "lora.text_encoder.lr=5e-5", "lora.text_encoder.targets=[q_proj]"],
     {"lora.text_encoder": {"rank": 2, "alpha": None, "targets": ["q_proj"], "lr": 5e-5}}),
    # the forms documented before keep working
    (["lora.text_encoder={rank: 4, alpha: 4, lr: 5e-5}"], {"lora.text_encoder.alpha": 4, "lora.text_encoder.lr": 5e-5}),
    (["+lora.text_encoder.rank=4"], {"lora.text_encoder.rank": 4}),
    (["+lora.text_encoder={rank: 3}"], {"lora.text_encoder.rank": 3}),
    (["lora.text_encoder=null"], {"lora.text_encoder": None}),
    # embedding.* without embedding=...: textual inversion, as embedding=ti (its full mapping)
    (["embedding.tokens=[olq]", "embedding.init=blue"],
     {"embedding": {"tokens": ["olq"], "init": "blue", "num_vectors": 1, "lr": 5e-3, "with_lora": False}}),
    (["embedding.tokens=[olq]", "embedding.init=blue", "embedding.with_lora=true"], {"embedding.with_lora": True}),
    ([*TI, "embedding.num_vectors=2"], {"embedding.num_vectors": 2, "embedding.with_lora": False}),
    (["embedding=pivotal", "embedding.tokens=[olq]", "embedding.init=blue"], {"embedding.with_lora": True}),
    (["eval.steps=5", "eval.seeds=[3]"], {"eval.steps": 5, "eval.seeds": [3]}),
    (["train.ema.decay=0.9", "train.ema.enabled=true"], {"train.ema.decay": 0.9, "train.ema.enabled": True}),
])
def test_documented_keys_are_plain_dotted_overrides(tmp_path, overrides, expected):
    from sdtune.run.checks import validate

    cfg = compose_cfg("experiment=quickstart", *overrides, output_dir=tmp_path)
    validate(cfg)  # fills in the keys a dotted override left out, and accepts the result
    for key, value in expected.items():
        node = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(node) if OmegaConf.is_config(node) else node) == value, key


@pytest.mark.parametrize(("override", "message"), [
    ("lora.rnak=8", r"lora.rnak is not a setting of sdtune .*Did you mean lora.rank\?"),
    ("lora.text_encoder.rnak=4", r"lora.text_encoder.rnak is not a setting of sdtune .*Did you mean lora.text_encoder.rank\?"),
    ("embedding.tokns=[olq]", r"embedding.tokns is not a setting of sdtune .*Did you mean embedding.tokens\?"),
    ("train.ema.decya=0.9", r"train.ema.decya is not a setting of sdtune .*Did you mean train.ema.decay\?"),
    ("eval.seed=[1]", r"eval.seed is not a setting of sdtune .*Did you mean eval.seeds\?"),
])
def test_an_unknown_dotted_key_gets_our_did_you_mean(capsys, tmp_path, no_model, override, message):
    _refused(capsys, tmp_path, [override], message)


@pytest.mark.slow
def test_a_text_encoder_key_turns_text_encoder_lora_on(capsys, tmp_path):
    """Acceptance 3: `python -m sdtune experiment=quickstart lora.text_encoder.rank=4 trainer.max_steps=4`."""
    from safetensors import safe_open

    run = tmp_path / "run"
    code, err = run_main(capsys, *BASE, "lora.text_encoder.rank=4", "trainer.max_steps=4", f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_") and k.endswith(".lora_down.weight") for k in keys), keys[:10]
    assert any(k.startswith("lora_unet_") for k in keys)


# -- 2. sizes bounded by what they can mean --------------------------------------------------------
def test_more_embedding_vectors_than_clip_holds_are_refused(capsys, tmp_path, no_model):
    _refused(capsys, tmp_path, [*TI, "embedding.num_vectors=1000"],
             r"embedding.num_vectors=1000 is more than a prompt can hold: the sd15 tokenizer 1 reads 77 tokens "
             r"\(75 between its start and end tokens\).*at most \d+ vector\(s\) per word fit.*Fix: embedding.num_vectors=")


def test_a_rank_wider_than_every_targeted_layer_is_refused(capsys, tmp_path, no_model):
    _refused(capsys, tmp_path, ["lora.type=loha", "lora.rank=1000"],
             r"lora.rank=1000 is larger than any layer it could adapt: the widest layer lora.targets selects in this "
             r"UNet has 64 features .*Fix: lora.rank=16 \(at most 64 here\)")


# -- 3. raw tracebacks -----------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lora_plus_ratio=16"], r"optim=prodigy\) uses one learning rate for every parameter group, but "
                                   r"optim.lora_plus_ratio=16.*Fix: optim.lora_plus_ratio=null"),
    (["embedding=pivotal", "embedding.tokens=[olq]", "embedding.init=blue"],
     r"but embedding.lr=0.005 differs from optim.optimizer.lr=1.0.*Fix: embedding.lr=1.0"),
    (["lora.text_encoder={rank: 2, lr: 5e-5}"],
     r"but lora.text_encoder.lr=5e-05 differs from optim.optimizer.lr=1.0.*Fix: lora.text_encoder.lr=1.0"),
])
def test_prodigy_with_several_learning_rates_is_refused(capsys, tmp_path, no_model, overrides, message):
    _refused(capsys, tmp_path, ["optim=prodigy", "optim.optimizer.lr=1.0", *overrides], message)


def test_prodigy_with_one_learning_rate_is_accepted(tmp_path):
    from sdtune.run.checks import validate

    for overrides in (["optim.lora_plus_ratio=1"], ["lora.text_encoder={rank: 2, lr: 1.0}"], TI,
                      ["optim.optimizer.lr=0", "lora.text_encoder={rank: 2, lr: 1.0}"]):
        validate(compose_cfg("experiment=quickstart", "optim=prodigy", "optim.optimizer.lr=1.0", *overrides,
                             output_dir=tmp_path))


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_cache_budget_that_is_no_number_is_refused(capsys, tmp_path, no_model, value):
    _refused(capsys, tmp_path, [f"data.cache_budget_gb={value}"],
             rf"data.cache_budget_gb must be a finite number of GB >= 0 or null .*got {value}. Fix: e.g. data.cache_budget_gb=4")


def test_a_gpu_preset_on_a_cpu_names_the_preset(capsys, tmp_path, no_model):
    if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    _refused(capsys, tmp_path, ["hardware=8gb"],
             r"hardware=8gb \(a GPU memory preset\) sets trainer.precision=16-mixed and optim=adamw8bit .*: "
             r"trainer.precision=16-mixed needs a CUDA GPU.*Fix: drop hardware=8gb .* trainer.precision=32 optim=adamw")


def test_a_missing_optimizer_package_is_named_with_its_pip_command(capsys, tmp_path, no_model):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    _refused(capsys, tmp_path, ["hardware=8gb", "trainer.precision=32"],
             r"hardware=8gb \(a GPU memory preset\) sets optim=adamw8bit .*optim.optimizer._target_="
             r"bitsandbytes.optim.AdamW8bit needs the package bitsandbytes.*Fix: pip install bitsandbytes, or .*optim=adamw")


# -- 4. wrong meaning: a new token that is a known word --------------------------------------------
@pytest.mark.parametrize("token", ["red", "red</w>"])
def test_a_new_token_that_is_already_a_word_is_refused(capsys, tmp_path, no_model, token):
    err = _refused(capsys, tmp_path, ["embedding=ti", f"embedding.tokens=['{token}']", "embedding.init=blue"],
                   rf"embedding.tokens: '{re.escape(token)}' is already a word of the sd15 tokenizer 1 \('red</w>'\), so a "
                   r"new token of that name would replace the word in every caption. Fix: pick a rare made-up string")
    assert "embedding.tokens=[olq]" in err


def test_known_word_reads_the_tokenizer_output():
    from transformers import CLIPTokenizer

    from sdtune.config.paths import ROOT
    from sdtune.training.embeddings import known_word

    tokenizer = CLIPTokenizer.from_pretrained(str(ROOT / "models" / "toy" / "sd15"), subfolder="tokenizer")
    assert known_word(tokenizer, "red") == "red</w>"
    assert known_word(tokenizer, "olq") is None and known_word(tokenizer, "olq_1") is None


# -- 5. messages -------------------------------------------------------------------------------------
def test_text_encoder_lora_with_dora_names_use_dora(tmp_path):
    from sdtune.run.checks import validate
    from sdtune.utils.errors import ConfigError

    cfg = compose_cfg("experiment=quickstart", "lora.text_encoder={rank: 2}", "lora.use_dora=true", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"not combined with lora.use_dora=true \(DoRA\) on the UNet. Fix: "
                                          r"lora.use_dora=false, or lora.text_encoder=null") as err:
        validate(cfg)
    assert "lora.type=lora" not in str(err.value)


# -- 6. text-encoder LoRA targets checked before the model loads -------------------------------------
def test_text_encoder_targets_are_checked_before_loading(capsys, tmp_path, no_model):
    _refused(capsys, tmp_path, ["lora.text_encoder={rank: 2, targets: [nope]}"],
             r"lora.text_encoder.targets: \['nope'\] match no linear layer of the sd15 text encoder 1 \(CLIPTextModel\). "
             r"Fix: use names such as \['q_proj', 'k_proj', 'v_proj', 'out_proj'\]")
