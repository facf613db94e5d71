"""Catalogue, resume inputs: a damaged ``.hydra/overrides.yaml``, or a ``ckpt_path`` that is no run
folder (or nothing at all), gives our message naming the file or folder and what a run folder
holds, exit 2, before Hydra composes a config without the run's settings (which said
"data.root is not set") and with nothing written anywhere."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.cli import run_cli_here
from tests.helpers.files import snapshot


@pytest.mark.parametrize("text, expected", [
    ("- experiment=quickstart\n- lora.rank: [8\n", r"is not valid YAML at line \d+, column \d+"),
    ("experiment: quickstart\nlora.rank: 8\n", r"holds a dict, not the list of overrides Hydra writes there"),
    ("- experiment=quickstart\n- lora.rank: 8\n", r"entry 2 is a dict \(\{'lora.rank': 8\}\), not an override string"),
    ("- experiment=quickstart\n- lora.rank=[8\n", r"the entry 'lora.rank=\[8' is not a Hydra override \(key=value\)"),
], ids=["unparsable-yaml", "a-mapping", "a-mapping-entry", "a-broken-override"])
def test_a_damaged_overrides_file_names_the_file_and_the_fix(tmp_path, capsys, text, expected):
    import re

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(text)
    (run / "checkpoints").mkdir()
    torch.save({"sdtune": {}}, run / "checkpoints" / "last.ckpt")
    before = snapshot(run)
    code, err = run_cli_here(capsys, f"ckpt_path={run}")
    assert code == 2, err[-3000:]
    assert re.search(f"{re.escape(str(run / '.hydra' / 'overrides.yaml'))}:? .*{expected}", err), err[-3000:]
    assert "Fix: restore" in err and "one override a line, e.g. `- lora.rank=8`" in err
    assert f"hydra.run.dir={run} ckpt_path=last" in err
    assert "data.root is not set" not in err and "Traceback" not in err and "Error parsing override" not in err
    assert snapshot(run) == before


@pytest.mark.parametrize("case", ["missing", "empty-folder", "checkpoints-only", "bare-checkpoint"])
def test_a_ckpt_path_that_is_no_run_folder_says_what_a_run_folder_holds(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the current folder (Hydra's outputs/) either
    target = tmp_path / "not-a-run"
    if case != "missing":
        target.mkdir()
    if case == "checkpoints-only":
        (target / "checkpoints").mkdir()
        torch.save({"sdtune": {}}, target / "checkpoints" / "last.ckpt")
    if case == "bare-checkpoint":
        torch.save({"sdtune": {}}, target / "last.ckpt")
        target = target / "last.ckpt"
    code, err = run_cli_here(capsys, f"ckpt_path={target}")
    assert code == 2, err[-3000:]
    expected = {"missing": "there is no such file or folder",
                "empty-folder": "is not a run folder: it holds no .hydra/overrides.yaml and no checkpoints",
                "checkpoints-only": "is not a run folder: it holds checkpoints but not .hydra/overrides.yaml",
                "bare-checkpoint": "is a checkpoint outside a run folder, so the settings it was trained with are unknown"}
    assert f"ckpt_path={str(target)!r}" in err and expected[case] in err, err[-3000:]
    if case != "bare-checkpoint":
        assert "A run folder (outputs/runs/<time>) holds .hydra/overrides.yaml" in err
    assert "data.root is not set" not in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists()


def test_a_relative_missing_ckpt_path_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli_here(capsys, "ckpt_path=outputs/runs/nope")
    assert code == 2 and f"there is no such file or folder (looked for {tmp_path}/outputs/runs/nope)" in err
