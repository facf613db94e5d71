"""The shared value checks (sdtune.config.values): what each accepts and refuses, and that every
refusal names the key, the value it got, what is accepted and the fix. In-process, no model."""

from __future__ import annotations

import math
import re

import pytest
from omegaconf import OmegaConf

from sdtune.config.values import Settings, boolean, choice, guidance, integer, number, path, setting
from sdtune.utils.errors import ConfigError


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return str(info.value)


# -- numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "value"), [
    ({}, 0), ({}, -3.5), ({"ge": 0}, 0), ({"gt": 0}, 1e-9), ({"ge": 0, "lt": 1}, 0.999),
    ({"ge": 0, "le": 1}, 1), ({"gt": 0, "lt": 1}, 0.5), ({"le": 10}, -100),
])
def test_number_accepts_values_inside_its_bounds_as_floats(kwargs, value):
    out = number("k", value, **kwargs)
    assert out == value and type(out) is float


@pytest.mark.parametrize(("kwargs", "value", "message"), [
    ({"gt": 0}, 0, "lora.alpha must be > 0, got 0."),
    ({"ge": 0}, -1e-06, "lora.alpha must be >= 0, got -1e-06."),
    ({"le": 4}, 4.5, "lora.alpha must be <= 4, got 4.5."),
    ({"lt": 4}, 4, "lora.alpha must be < 4, got 4."),
    ({"ge": 0, "lt": 1}, 1.5, "lora.alpha must be in [0, 1), got 1.5."),
    ({"gt": 0, "lt": 1}, 1.0, "lora.alpha must be in (0, 1), got 1.0."),
    ({"gt": 0, "le": 1}, 0, "lora.alpha must be in (0, 1], got 0."),
    # a closed range names its kind, as does a described null
    ({"ge": 0, "le": 1}, 1.5, "lora.alpha must be a number from 0 to 1, got 1.5."),
    ({"gt": 0, "optional": "the rank"}, -2, "lora.alpha must be a number > 0 or null (the rank), got -2."),
    ({"gt": 0, "full": True}, 0, "lora.alpha must be a number > 0, got 0."),
])
def test_number_out_of_range_names_key_value_and_bounds(kwargs, value, message):
    assert refused(number, "lora.alpha", value, **kwargs) == message


@pytest.mark.parametrize(("value", "shown"), [("abc", "'abc'"), (True, "True"), (None, "None"), ([1], "[1]")])
def test_number_refuses_what_is_no_number_with_its_repr(value, shown):
    assert refused(number, "train.noise_offset", value, ge=0) == f"train.noise_offset must be a number >= 0, got {shown}."


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_number_refuses_nan_and_inf(value):
    assert refused(number, "optim.optimizer.lr", value, gt=0) == f"optim.optimizer.lr must be a finite number, got {value!r}."


def test_optional_number_takes_null_and_says_so_when_refusing():
    assert number("lora.alpha", None, gt=0, optional=True) is None
    assert refused(number, "lora.alpha", None, gt=0) == "lora.alpha must be a number > 0, got None."
    assert refused(number, "lora.alpha", "x", gt=0, optional=True) == "lora.alpha must be a number > 0 or null, got 'x'."
    # optional=True alone keeps the short range form
    assert refused(number, "lora.alpha", 0, gt=0, optional=True) == "lora.alpha must be > 0, got 0."


def test_the_fix_ends_every_message():
    fix = "e.g. strength=0.5 (0 keeps the input, 1 ignores it)."
    for value in (1.5, "x", math.nan):
        assert refused(number, "strength", value, ge=0, le=1, fix=fix).endswith(f" Fix: {fix}")


# -- integers --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "value"), [({"ge": 1}, 1), ({"ge": 0}, 0), ({"ge": 0, "le": 10}, 10), ({}, -7)])
def test_integer_accepts_ints_inside_its_bounds(kwargs, value):
    assert integer("k", value, **kwargs) == value


@pytest.mark.parametrize(("value", "kwargs", "message"), [
    (0, {"ge": 1}, "lora.rank must be >= 1, got 0. Fix: e.g. lora.rank=16."),
    ("abc", {"ge": 1}, "lora.rank must be an integer >= 1, got 'abc'. Fix: e.g. lora.rank=16."),
    (4.0, {"ge": 1}, "lora.rank must be an integer >= 1, got 4.0. Fix: e.g. lora.rank=16."),
    (True, {"ge": 1}, "lora.rank must be an integer >= 1, got True. Fix: e.g. lora.rank=16."),
    (0, {"ge": 1, "full": True}, "lora.rank must be an integer >= 1, got 0. Fix: e.g. lora.rank=16."),
    (11, {"ge": 0, "le": 10}, "lora.rank must be an integer from 0 to 10, got 11. Fix: e.g. lora.rank=16."),
    (0, {"ge": 1, "full": True, "kind": "a whole number"}, "lora.rank must be a whole number >= 1, got 0. Fix: e.g. lora.rank=16."),
])
def test_integer_refusals(value, kwargs, message):
    assert refused(integer, "lora.rank", value, fix="e.g. lora.rank=16.", **kwargs) == message


def test_optional_integer_with_a_described_null():
    assert integer("eval.every_n_steps", None, ge=1, optional="evaluate at each validation") is None
    assert refused(integer, "eval.every_n_steps", 0, ge=1, optional="evaluate at each validation") == (
        "eval.every_n_steps must be an integer >= 1 or null (evaluate at each validation), got 0.")


# -- guidance --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1, 7.5, 0.01, 100])
def test_guidance_accepts_positive_scales(value):
    assert guidance("guidance", value) == float(value)


@pytest.mark.parametrize(("value", "got"), [(0, "got 0."), (-1, "got -1."), ("high", "got 'high'."), (False, "got False.")])
def test_guidance_refuses_zero_negative_and_non_numbers_in_one_form(value, got):
    fix = "e.g. guidance=5 (1 turns guidance off)."
    assert refused(guidance, "guidance", value, fix=fix) == f"guidance must be a number > 0, {got} Fix: {fix}"


def test_guidance_refuses_inf_and_takes_a_described_null():
    assert "finite" in refused(guidance, "guidance", math.inf)
    assert guidance("eval.guidance", None, optional="the base model's own scale") is None
    assert refused(guidance, "eval.guidance", 0, optional="the base model's own scale") == (
        "eval.guidance must be a number > 0 or null (the base model's own scale), got 0.")


# -- choices and switches --------------------------------------------------------------------------
def test_choice_accepts_a_listed_value_and_lists_them_when_refusing():
    assert choice("save_dtype", "fp16", ("fp16", "bf16", "fp32")) == "fp16"
    assert choice("train.prediction_type", None, (None, "epsilon")) is None
    assert refused(choice, "lora.init", "pissa", ("gaussian", True, False)) == (
        "lora.init must be one of ['gaussian', True, False], got 'pissa'.")


def test_choice_in_words_with_a_fix():
    message = refused(choice, "data.pin_memory", "yes", ("auto", True, False), said="true, false or auto",
                      fix="e.g. data.pin_memory=auto.")
    assert message == "data.pin_memory must be true, false or auto, got 'yes'. Fix: e.g. data.pin_memory=auto."


@pytest.mark.parametrize("value", [True, False])
def test_boolean_accepts_true_and_false(value):
    assert boolean("train.ema.enabled", value) is value


@pytest.mark.parametrize(("value", "shown"), [("yes", "'yes'"), (1, "1"), (0, "0"), (None, "None")])
def test_boolean_refuses_anything_else(value, shown):
    assert refused(boolean, "train.ema.enabled", value) == f"train.ema.enabled must be true or false, got {shown}."


def test_optional_boolean_takes_null():
    assert boolean("model.allow_pickle", None, optional=True) is None


# -- paths -----------------------------------------------------------------------------------------
def test_path_checks_existence_files_and_folders(tmp_path):
    file = tmp_path / "a.png"
    file.write_bytes(b"x")
    assert path("images[0]", str(file), must="file") == file
    assert path("data.root", tmp_path, must="folder") == tmp_path
    assert path("data.root", str(file)) == file  # must="exist": either
    fix = "give the path of an existing image."
    assert refused(path, "images[0]", str(tmp_path / "b.png"), must="file", fix=fix) == (
        f"images[0]={str(tmp_path / 'b.png')!r} is not a file. Fix: {fix}")
    assert refused(path, "images[0]", str(tmp_path), must="file").endswith("is a folder, not a file.")
    assert refused(path, "data.root", str(file), must="folder").endswith("is a file, not a folder.")
    assert refused(path, "data.root", str(tmp_path / "absent"), must="folder").endswith("is not a folder.")
    assert refused(path, "data.root", str(tmp_path / "absent")).endswith("does not exist.")
    assert refused(path, "data.root", None, fix="data.root=<folder>.") == "data.root is not set. Fix: data.root=<folder>."


def test_path_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert path("out", "~", must="folder") == tmp_path


# -- reading a config ------------------------------------------------------------------------------
def test_settings_read_dotted_keys_of_dictconfigs_and_plain_mappings():
    cfg = OmegaConf.create({"lora": {"rank": 0, "alpha": None}, "missing": "???"})
    assert setting(cfg, "lora.alpha") is None and setting(cfg, "lora.absent") is None and setting(cfg, "missing") is None
    assert setting({"a": {"b": 2}}, "a.b") == 2 and setting({"a": 1}, "a.b") is None
    s = Settings(cfg)
    assert s.number("lora.alpha", gt=0, optional=True) is None
    with pytest.raises(ConfigError, match=re.escape("lora.rank must be >= 1, got 0. Fix: e.g. lora.rank=16.")):
        s.integer("lora.rank", ge=1, fix="e.g. lora.rank=16.")
