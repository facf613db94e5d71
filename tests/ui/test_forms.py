"""The new-run form: presets, the argv it stands for, and its checks, which are the command line's own."""

from __future__ import annotations

import shlex

import pytest
from omegaconf import OmegaConf, open_dict

from sdtune.config.overrides import normalize_overrides
from sdtune.run.checks import validate
from sdtune.run.preflight import compose_training, conf_targets
from sdtune.ui.forms import unknown_targets
from sdtune.utils.errors import ConfigError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_cfg
from tests.helpers.ui import client

QUICK = {"experiment": "quickstart", "model": None}


def cli_message(*argv: str) -> str:
    """The ConfigError the command line's steps raise for ``argv`` (normalize, compose, validate), taken
    through the tests' own composition (tests/helpers/config.py), not the web app's."""
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*argv))
    return str(err.value)


@pytest.mark.slow  # composes configs (0.3 s each) and runs the checks
def test_presets_list_the_conf_groups_and_the_presets_defaults(tmp_path):
    web = client(tmp_path)
    plain = web.get("/api/presets").json()
    assert "quickstart" in plain["experiments"] and "toy" in plain["models"] and "_base" not in plain["models"]
    quick = {f["key"]: f for f in web.get("/api/presets", params={"experiment": "quickstart"}).json()["fields"]}
    assert quick["lora.rank"]["default"] == 4 and quick["trainer.max_steps"]["default"] == 300
    assert quick["data.resolution"]["default"] == 64 and quick["data.root"]["default"].endswith("examples/quickstart")
    assert {f["type"] for f in quick.values()} == {"int", "float", "str", "bool"}


@pytest.mark.slow  # composes configs (0.3 s each) and runs the checks
def test_a_bad_value_gets_the_command_lines_message_beside_its_field(tmp_path):
    web = client(tmp_path)
    answer = web.post("/api/check", json={**QUICK, "fields": {"lora.rank": "-1"}, "overrides": "trainer.max_steps=16"})
    body = answer.json()
    assert answer.status_code == 200 and body["ok"] is False
    assert body["argv"] == ["experiment=quickstart", "lora.rank=-1", "trainer.max_steps=16"]
    assert body["errors"] == [{"field": "lora.rank", "message": cli_message(*body["argv"])}]
    assert body["command"] == "python -m sdtune experiment=quickstart lora.rank=-1 trainer.max_steps=16"
    typo = web.post("/api/check", json={**QUICK, "overrides": "lora.rankk=3"}).json()
    with pytest.raises(ConfigError) as err:
        normalize_overrides(["experiment=quickstart", "lora.rankk=3"])
    assert typo["errors"] == [{"field": "overrides", "message": str(err.value)}] and "Did you mean lora.rank" in str(err.value)


@pytest.mark.slow  # composes configs (0.3 s each) and runs the checks
def test_fields_at_the_presets_default_are_left_out_and_the_command_is_the_argv(tmp_path):
    web = client(tmp_path)
    body = web.post("/api/check", json={**QUICK, "model": "toy", "fields": {"lora.rank": 4, "optim.optimizer.lr": "0.002",
                                                                            "seed": "7", "data.root": ""},
                                        "overrides": "trainer.max_steps=16 'data.caption_dropout=0.1'"}).json()
    assert body["ok"] is True, body
    assert body["argv"] == ["experiment=quickstart", "seed=7", "trainer.max_steps=16", "data.caption_dropout=0.1"]
    assert shlex.split(body["command"]) == ["python", "-m", "sdtune", *body["argv"]]


REFUSED = [
    ("model._target_=os.system", "_target_ is refused"),
    ("+callbacks.x._target_=builtins.exec", "_target_ is refused"),
    ("callbacks.samples={_target_:os.system}", "_target_ is refused"),
    ("hydra.run.dir=/", "Hydra's own settings"),
    ("hydra/job_logging=disabled", "Hydra's own settings"),
    ("lora.rank=${oc.create:8}", "resolver oc.create"),
    ("-m", "flags are not taken"),
]


def test_targets_hydra_keys_and_node_building_resolvers_are_refused_before_composing(tmp_path):
    web = client(tmp_path)
    for overrides, said in REFUSED:
        body = web.post("/api/check", json={**QUICK, "overrides": overrides}).json()
        assert body["ok"] is False and body["errors"][0]["field"] == "overrides", overrides
        assert said in body["errors"][0]["message"] and repr(overrides) in body["errors"][0]["message"], overrides
    field = web.post("/api/check", json={**QUICK, "fields": {"data.root": "/x/_target_"}}).json()
    assert field["errors"][0]["field"] == "data.root" and "_target_ is refused" in field["errors"][0]["message"]
    assert web.post("/api/jobs", json={**QUICK, "overrides": "hydra.run.dir=/"}).status_code == 400
    assert web.get("/api/jobs").json() == {"jobs": []}


@pytest.mark.slow  # composes configs (0.3 s each) and runs the checks
def test_a_composed_target_no_preset_names_is_found():
    cfg = compose_training(["experiment=quickstart"])
    assert unknown_targets(cfg, conf_targets()) == []
    with open_dict(cfg):
        cfg.callbacks.extra = OmegaConf.create({"_target_": "os.system", "command": "true"})
    assert unknown_targets(cfg, conf_targets()) == ["callbacks.extra._target_=os.system"]


@pytest.mark.slow  # composes configs (0.3 s each) and runs the checks
def test_a_bad_dataset_is_a_400_with_the_runs_message_never_a_crash(tmp_path):
    web = client(tmp_path / "outputs")
    missing = tmp_path / "nowhere"
    answer = web.post("/api/jobs", json={**QUICK, "fields": {"data.root": str(missing)}})
    assert answer.status_code == 400
    (error,) = answer.json()["errors"]
    assert error["field"] == "data.root" and f"data.root='{missing}' does not exist" in error["message"]
    (tmp_path / "empty").mkdir()
    empty = web.post("/api/jobs", json={**QUICK, "fields": {"data.root": str(tmp_path / "empty")}}).json()
    assert empty["errors"][0]["field"] == "data.root" and "holds no images" in empty["errors"][0]["message"]
    assert web.get("/api/jobs").json() == {"jobs": []}
    assert web.post("/api/check", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400


@pytest.mark.slow
def test_the_message_is_what_python_m_sdtune_prints(tmp_path):
    argv = ["experiment=quickstart", "lora.rank=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    body = client(tmp_path).post("/api/check", json={**QUICK, "fields": {"lora.rank": -1}}).json()
    printed = run_cli(*argv)
    assert printed.returncode == 2
    assert f"error: {body['errors'][0]['message']}" in printed.stderr


def test_group_values_must_be_options_of_conf_and_package_overrides_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.yaml").write_text("# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: os.system\n")
    web = client(tmp_path / "outputs")
    cases = [(f"experiment=../../../../..{tmp_path}/x/a", "is not an option of sdtune's conf/experiment/"),
             ("+callbacks@hydra.callbacks=default", "package override"), ("model=/etc/x", "conf/model/"),
             ("optim=adamw/../../x", "conf/optim/"), ("+debug=..", "conf/debug/"),
             ("bench/preset=../../x", "conf/bench/preset/"), ("experiment/../x=y", "not a config group")]
    for overrides, said in cases:
        body = web.post("/api/check", json={"experiment": None, "model": None, "overrides": overrides}).json()
        assert body["ok"] is False and body["errors"][0]["field"] == "overrides", overrides
        assert said in body["errors"][0]["message"], (overrides, body)
    preset = web.post("/api/check", json={"experiment": "../x/a", "model": None}).json()
    assert preset["errors"][0]["field"] == "experiment" and "not a preset" in preset["errors"][0]["message"]
    assert web.post("/api/jobs", json={"overrides": cases[0][0]}).status_code == 400
    assert web.get("/api/jobs").json() == {"jobs": []}


@pytest.mark.slow  # composes configs (0.3 s each) and runs the checks
def test_hydras_own_section_is_checked_for_targets_and_the_device_check_is_the_clis(tmp_path):
    from sdtune.run.checks import check_device
    from sdtune.ui.forms import hydra_targets

    cfg = compose_training(["experiment=quickstart"], return_hydra_config=True)
    assert unknown_targets(cfg, conf_targets() | hydra_targets()) == []
    with open_dict(cfg):
        cfg.hydra.callbacks.x = OmegaConf.create({"_target_": "os.system"})
    assert unknown_targets(cfg, conf_targets() | hydra_targets()) == ["hydra.callbacks.x._target_=os.system"]
    body = client(tmp_path).post("/api/check", json={**QUICK, "fields": {"trainer.precision": "16-mixed"}}).json()
    with pytest.raises(ConfigError) as err:
        check_device(compose_cfg("experiment=quickstart", "trainer.precision=16-mixed"))
    assert body["ok"] is False and body["errors"] == [{"field": "trainer.precision", "message": str(err.value)}]
