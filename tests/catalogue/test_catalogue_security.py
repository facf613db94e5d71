"""Catalogue, security: a shared file must never run code or lift a safety switch.

A run folder someone shared (``python -m sdtune ckpt_path=<folder>``) and a LoRA file's header are
data: resuming replays only vetted overrides (no ``_target_``, no added callback, no Hydra setting,
no ``model.allow_pickle``, no pickle path inside the folder) and prints what it replays; a header
never lifts ``model.allow_pickle``. Every model sdtune loads (base, VAE, ControlNet, CLIP/DINO
evaluators) passes one gate that refuses pickle weights unless ``model.allow_pickle=true`` is on
this command line. Each attack here creates a marker file (or truncates a victim) when it works.
"""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sdtune.families import get_family
from sdtune.lora.layers import spec_from_config
from sdtune.utils.errors import ModelLoadError
from tests.helpers.cli import run_cli_here, run_main
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.files import snapshot
from tests.helpers.paths import QUICKSTART, ROOT

PNG = QUICKSTART / "images" / "sks_00_red_circle.png"
RUN_ARGS = ["experiment=quickstart", "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0",
            "trainer.max_steps=2"]


class WritesMarker:
    """A pickle that creates ``path`` when it is unpickled: proof that loading it ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bomb(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": WritesMarker(marker)}, path)
    return path


def run_generate(capsys, out, *overrides: str) -> tuple[int, str]:
    """``python -m sdtune.generate OVERRIDES`` in this process: (exit code, stderr)."""
    from hydra import compose, initialize_config_dir

    from sdtune.generate import generate
    from sdtune.utils.errors import exit_on_user_error

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=list(overrides))
    try:
        with exit_on_user_error():
            generate(cfg, out)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def shared_run(tmp_path, *extra: str):
    """A run folder as someone could share it: the quickstart command line plus ``extra``, and a
    checkpoint that passes the resume checks (so on the old code the run got as far as building
    its callbacks)."""
    run = tmp_path / "shared"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*RUN_ARGS, *extra]))
    (run / "checkpoints").mkdir()
    torch.save(_checkpoint(), run / "checkpoints" / "last.ckpt")
    return run


@functools.cache
def _checkpoint() -> dict:
    """The least checkpoint the resume checks accept for RUN_ARGS (no weights: fitting would fail later)."""
    cfg = resolved(compose_cfg(*RUN_ARGS))
    family = get_family(cfg["model"]["family"])
    spec = spec_from_config(cfg["lora"], family.default_lora_targets)
    return {"sdtune": {"family": family.name, "rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets),
                       "adapter": spec.kind, "text_encoder": None},
            "hyper_parameters": {"cfg": {}}, "global_step": 0, "state_dict": {}}


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("years of work")
    return path


def test_a_shared_run_cannot_truncate_a_file_through_an_added_callback(tmp_path, capsys, victim):
    run = shared_run(tmp_path, "+callbacks.x._target_=builtins.open", f"+callbacks.x.file={victim}", "+callbacks.x.mode=w")
    before = snapshot(run)
    code, err = run_cli_here(capsys, f"ckpt_path={run}")
    assert code == 2, err[-3000:]
    assert victim.read_text() == "years of work"
    assert f"{run / '.hydra' / 'overrides.yaml'} holds override(s) that resuming does not replay" in err
    assert "'+callbacks.x._target_=builtins.open': it sets a _target_" in err
    assert "_target_ comes only from sdtune's own conf/" in err
    assert "'+callbacks.x.mode=w': it adds callbacks.x.mode, which sdtune's conf/ does not define" in err
    assert "Nothing was run" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_a_shared_run_cannot_unpickle_a_file_in_its_folder(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    run = shared_run(tmp_path, "+callbacks.x._target_=torch.load", "+callbacks.x.f=${paths.output_dir}/notes.pkl",
                     "+callbacks.x.weights_only=false")
    pickle_bomb(run / "notes.pkl", marker)
    before = snapshot(run)
    code, err = run_cli_here(capsys, f"ckpt_path={run}")
    assert code == 2, err[-3000:]
    assert not marker.exists()
    assert "'+callbacks.x._target_=torch.load': it sets a _target_" in err and "Traceback" not in err
    assert snapshot(run) == before


@pytest.mark.parametrize("bypass", ["_target_ in a value", "resolver", "hydra callback", "changed _target_"])
def test_other_ways_to_smuggle_a_target_are_refused(tmp_path, capsys, victim, bypass):
    line = {"_target_ in a value": f"callbacks.samples={{_target_: builtins.open, file: '{victim}', mode: w}}",
            "resolver": f"callbacks.samples='${{oc.create:{{dirpath: {victim.parent}}}}}'",
            "hydra callback": "+hydra.callbacks.x._target_=builtins.open",
            "changed _target_": "callbacks.summary._target_=builtins.open"}[bypass]
    run = shared_run(tmp_path, line)
    code, err = run_cli_here(capsys, f"ckpt_path={run}")
    assert code == 2, err[-3000:]
    assert victim.read_text() == "years of work"
    assert "resuming does not replay" in err and repr(line) in err


@pytest.mark.parametrize("switch_given", [False, True])
def test_a_shared_run_cannot_lift_the_pickle_refusal(tmp_path, capsys, switch_given):
    """Replayed model.allow_pickle=true is dropped (said so); a replayed model.path to a pickle inside
    the shared folder is refused even when the user allows pickles on this command line."""
    marker = tmp_path / "code-ran"
    run = tmp_path / "shared"
    bomb = pickle_bomb(run / "base.ckpt", marker)
    run = shared_run(tmp_path, "model.allow_pickle=true", f"model.path={bomb}")
    code, err = run_cli_here(capsys, f"ckpt_path={run}", *(["model.allow_pickle=true"] if switch_given else []))
    assert code == 2, err[-3000:]
    assert not marker.exists()
    if not switch_given:
        assert "resume: not replaying 'model.allow_pickle=true'" in err
        assert "model.allow_pickle is a safety switch: it counts only when given on this command line" in err
    assert f"'model.path={bomb}': it names pickle weights inside the shared run folder" in err


@pytest.mark.parametrize("line", ["model={allow_pickle: true}", "+data={allow_outside_root: true}"])
def test_a_safety_switch_inside_a_mapping_is_not_replayed(tmp_path, capsys, line):
    """A mapping on a section sets its keys as well as a dotted override does; the switch stays off."""
    from sdtune.run.resume import resume_argv

    run = shared_run(tmp_path, line)
    argv = resume_argv([f"ckpt_path={run}"])
    err = capsys.readouterr().err
    assert f"resume: not replaying {line!r}" in err and "is a safety switch" in err
    cfg = compose_cfg(*[a for a in argv if not a.startswith(("ckpt_path=", "hydra."))])
    assert cfg.model.allow_pickle is False and cfg.data.allow_outside_root is False


@pytest.mark.parametrize("line", ["model.path=${oc.select:paths.output_dir}/base",
                                  "model={path: '${hydra:runtime.output_dir}/base'}",
                                  "controlnet.path=${paths.output_dir}/cn"])
def test_a_model_path_through_an_interpolation_is_refused(tmp_path, capsys, line):
    """Where an interpolated path leads is known only after composing: it cannot be vetted for pickles."""
    marker = tmp_path / "code-ran"
    run = shared_run(tmp_path, line)
    pickle_bomb(run / "base" / "unet" / "diffusion_pytorch_model.bin", marker)
    code, err = run_cli_here(capsys, f"ckpt_path={run}", "model.allow_pickle=true")
    assert code == 2, err[-3000:]
    assert not marker.exists()
    assert f"{line!r}: it sets the model path" in err and "through an interpolation" in err


def test_a_legitimate_run_folder_replays_and_prints_its_command_line(tmp_path, capsys):
    from sdtune.run.resume import resume_argv

    saved = [*RUN_ARGS, "lora.rank=8", "+optim.scheduler.num_cycles=3", "paths.output_root=${sdtune_cwd:}/out",
             "~callbacks.lr_monitor", "model=toy", "seed=${oc.env:NO_SUCH_VARIABLE,7}"]
    run = shared_run(tmp_path, *saved[len(RUN_ARGS):])
    argv = resume_argv([f"ckpt_path={run}", "trainer.max_steps=3"])
    err = capsys.readouterr().err
    replayed = [s for s in saved if s != "trainer.max_steps=2"]  # given now: the new value wins
    switches = ["++model.allow_pickle=false", "++data.allow_outside_root=false"]  # decided by this command line
    assert argv == [*replayed, *switches, f"ckpt_path={run}", "trainer.max_steps=3", f"hydra.run.dir={run}"]
    assert f"resume: replaying the command line of {run} (.hydra/overrides.yaml): {' '.join(replayed)}" in err


def test_a_lora_header_cannot_lift_the_pickle_refusal_in_generate(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    bomb = pickle_bomb(tmp_path / "base.ckpt", marker)
    lora = tmp_path / "downloaded.safetensors"
    header = {"model": {"family": "sd15", "path": str(bomb), "allow_pickle": True, "resolution": 64}}
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.zeros(4, 32)}, str(lora),
              metadata={"sdtune.config": json.dumps(header), "sdtune.family": "sd15"})
    before = snapshot(tmp_path)
    code, err = run_generate(capsys, tmp_path / "gen", f"loras=[{lora}]", "prompt=x", "num_images=1", "steps=1",
                             "device=cpu")
    assert code == 2, err[-3000:]
    assert not marker.exists()
    assert f"model.path={str(bomb)!r} (from the header of {lora}) is a pickle-based checkpoint" in err
    assert "a path read from a file is never loaded as a pickle" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def pickle_model_folder(folder, marker, part="unet", name="diffusion_pytorch_model.bin", config=None):
    """A model folder whose ``part`` holds only pickle weights (its config beside them)."""
    (folder / part).mkdir(parents=True, exist_ok=True)
    (folder / part / "config.json").write_text(json.dumps(config or {}))
    pickle_bomb(folder / part / name, marker)
    return folder


@pytest.mark.parametrize("key", ["model.path", "model.vae_path"])
def test_base_model_and_vae_folders_of_pickles_are_refused(tmp_path, capsys, tiny_sd15, key):
    marker = tmp_path / "code-ran"
    if key == "model.path":
        folder = tmp_path / "model"
        shutil.copytree(tiny_sd15, folder)
        for f in (folder / "unet").glob("*.safetensors"):
            f.unlink()
        pickle_bomb(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    else:
        folder = pickle_model_folder(tmp_path / "vae", marker, part=".", config={"_class_name": "AutoencoderKL"})
    before = snapshot(folder)
    code, err = run_main(capsys, *RUN_ARGS, f"{key}={folder}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err[-3000:]
    assert not marker.exists()
    assert f"{key}={str(folder)!r} is a model folder whose weights are only pickles" in err
    assert "set model.allow_pickle=true on the command line if you trust where it came from" in err
    assert snapshot(folder) == before


@pytest.mark.parametrize("key", ["eval.clip_model", "eval.dino_model", "eval.aesthetic_model"])
def test_evaluator_folders_of_pickles_are_refused_before_any_model_loads(tmp_path, capsys, key):
    marker = tmp_path / "code-ran"
    folder = pickle_model_folder(tmp_path / "clip", marker, part=".", name="pytorch_model.bin",
                                 config={"model_type": "clip"})
    code, err = run_main(capsys, *RUN_ARGS, f"eval.prompts=[{{prompt: a red circle, references: [{PNG}]}}]", f"{key}={folder}",
                         f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err[-3000:]
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert f"{key}={str(folder)!r} is a model folder whose weights are only pickles (pytorch_model.bin)" in err


def test_a_controlnet_of_pickles_is_refused_before_the_base_loads(tmp_path, capsys, tiny_sd15):
    marker = tmp_path / "code-ran"
    folder = pickle_model_folder(tmp_path / "cn", marker, part=".", config={"_class_name": "ControlNetModel"})
    code, err = run_generate(capsys, tmp_path / "gen", "model=tiny", f"model.path={tiny_sd15}", "prompt=x", "num_images=1",
                             "steps=1", f"init_image={PNG}", f"controlnet.path={folder}", "controlnet.preprocess=none")
    assert code == 2, err[-3000:]
    assert not marker.exists()
    assert f"controlnet.path={str(folder)!r} is a model folder whose weights are only pickles" in err


def test_the_gate_lets_safe_weights_through_and_pickles_only_when_allowed(tmp_path, tiny_sd15):
    from sdtune.families.source import check_weights, pickle_weights

    assert pickle_weights(tiny_sd15) == []
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_sd15, mixed)
    torch.save({"w": torch.zeros(1)}, mixed / "unet" / "diffusion_pytorch_model.bin")  # beside its .safetensors
    assert pickle_weights(mixed) == []  # diffusers loads the .safetensors
    (mixed / "safety_checker").mkdir()
    torch.save({"w": torch.zeros(1)}, mixed / "safety_checker" / "pytorch_model.bin")
    assert pickle_weights(mixed) == []  # a part sdtune never loads
    renamed = pickle_bomb(tmp_path / "base.weights", tmp_path / "code-ran")
    assert pickle_weights(renamed) == [renamed]  # any single file but .safetensors/.gguf goes to torch.load
    with pytest.raises(ModelLoadError, match=r"base.weights' is a pickle-based checkpoint"):
        check_weights(renamed, key="model.path", allow_pickle=False)
    ckpt = tmp_path / "base.pth"
    torch.save({"w": torch.zeros(1)}, ckpt)
    check_weights(ckpt, key="model.path", allow_pickle=True)  # the user's own switch
    check_weights("owner/hub-id", key="model.path", allow_pickle=False)  # not local: judged when it is
    with pytest.raises(ModelLoadError, match=r"model.path=.*base.pth' \(from the header of x\) is a pickle-based"):
        check_weights(ckpt, key="model.path", allow_pickle=True, origin="from the header of x")
