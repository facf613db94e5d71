"""Every shipped config composes, validates and names only real settings.

Configs nothing else runs (the production presets, multi-GPU trainers, GPU bench presets, debug
runs) rot silently: a renamed key or a typo in a Lightning argument only shows on the machine that
finally uses it. Each is composed here as the command line would, then checked by the same
validation a run does, and every trainer key must be an argument of ``lightning.Trainer``.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from sdtune.run.checks import validate
from sdtune.run.train import SDTUNE_TRAINER_KEYS
from tests.helpers.cli import run_cli
from tests.helpers.paths import QUICKSTART, ROOT

CONF = ROOT / "conf"
TRAINER_ARGS = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def options(group: str) -> list[str]:
    """The selectable configs of a group (``_base`` files are shared parts, not options)."""
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix()
                  for p in (CONF / group).rglob("*.yaml") if not p.name.startswith("_"))


ROOT_GROUPS = ("experiment", "model", "trainer", "debug", "optim", "logger", "data", "lora", "callbacks", "hparams_search")
CASES = [f"{group}={name}" for group in ROOT_GROUPS for name in options(group)]


def _compose(config: str, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config, overrides=[*overrides, "paths.output_dir=/nonexistent-output"], return_hydra_config=True)


def _check(cfg) -> None:
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra checks its own node against its schema when composing
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if cfg.data.root is None:
        cfg.data.root = str(QUICKSTART)  # the one setting no preset can know
    validate(cfg)
    unknown = set(cfg.trainer) - TRAINER_ARGS - set(SDTUNE_TRAINER_KEYS)
    assert not unknown, f"trainer keys that lightning.Trainer does not take: {sorted(unknown)}"


def test_the_groups_hold_the_configs_the_docs_promise():
    assert {"sd15_lora", "sdxl_lora", "kolors_lora", "flux_lora", "sd35_lora", "quickstart"} <= set(options("experiment"))
    assert set(options("debug")) == {"default", "fdr", "overfit", "limit"}
    assert {"gpu_sd15", "gpu_sdxl", "gpu_kolors", "gpu_flux", "gpu_sd35", "cpu_tiny"} == set(options("bench/preset"))


@pytest.mark.parametrize("override", CASES)
def test_every_training_config_composes_and_validates(override):
    _check(_compose("config", override))


@pytest.mark.parametrize("preset", options("bench/preset"))
def test_every_bench_preset_composes_and_validates(preset):
    cfg = _compose("bench", f"bench/preset={preset}")
    _check(cfg)
    if preset.startswith("gpu_"):  # built on the production preset of its family
        production = _compose("config", f"experiment={preset.removeprefix('gpu_')}_lora")
        assert cfg.model.family == production.model.family
        assert cfg.lora == production.lora and cfg.train.gradient_checkpointing == production.train.gradient_checkpointing


def test_every_model_inherits_the_common_keys():
    base = set(OmegaConf.load(CONF / "model" / "_base.yaml"))
    for name in options("model"):
        assert set(_compose("config", f"model={name}").model) == base, name


@pytest.mark.parametrize("preset", ["sd15_lora", "sdxl_lora", "kolors_lora", pytest.param("flux_lora", marks=pytest.mark.slow),
                                    pytest.param("sd35_lora", marks=pytest.mark.slow)])
def test_production_presets_print_and_fail_fast_without_weights(tmp_path, preset):
    """``--cfg job`` prints the preset; a real run without the weights stops at the load, clearly."""
    printed = run_cli(f"experiment={preset}", "--cfg", "job")
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert f"family: {preset.removesuffix('_lora')}" in printed.stdout
    missing = tmp_path / "no-such-model"
    proc = run_cli(f"experiment={preset}", f"data.root={QUICKSTART}", f"model.path={missing}", "trainer.accelerator=cpu",
                   "trainer.precision=32", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Fix:" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "hub_id"), [("flux_lora", "black-forest-labs/FLUX.1-dev"),
                                               ("sd35_lora", "stabilityai/stable-diffusion-3.5-large")])
def test_flow_presets_without_the_hub_stop_at_the_load_naming_the_hub_id_and_the_fix(tmp_path, preset, hub_id):
    """The preset's own model.path (a hub id) with the hub out of reach (offline, and an empty hub
    cache, whatever this machine has): exit 2 with the load error, before any training starts."""
    proc = run_cli(f"experiment={preset}", f"data.root={QUICKSTART}", "trainer.accelerator=cpu", "trainer.precision=32",
                   f"hydra.run.dir={tmp_path / 'run'}", timeout=120, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"Could not load the {preset.removesuffix('_lora')} base model from model.path={hub_id!r}" in proc.stderr
    assert "not in the local hub cache" in proc.stderr and "Fix: set model.path to a local diffusers folder" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_debug_runs_do_what_they_say(tmp_path):
    """debug=fdr: one step and no outputs but config and logs; debug=limit: 3 epochs of 3 batches."""
    from sdtune.training.checkpointing import load_checkpoint

    fdr = tmp_path / "fdr"
    proc = run_cli("experiment=quickstart", "model=tiny", "debug=fdr", f"hydra.run.dir={fdr}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fast_dev_run" in proc.stdout + proc.stderr
    assert (fdr / "config.yaml").is_file()
    assert not [p.name for p in fdr.iterdir() if p.name in ("checkpoints", "lora.safetensors", "samples.png", "summary.json")]
    limit = tmp_path / "limit"
    proc = run_cli("experiment=quickstart", "model=tiny", "debug=limit", "data.batch_size=1", "callbacks.samples=null",
                   "callbacks.concept_probe=null", f"hydra.run.dir={limit}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(limit / "checkpoints" / "last.ckpt")["global_step"] == 9  # 3 epochs x 3 of 12 batches


def test_a_sweep_receives_the_optimized_metric(capsys):
    from sdtune.__main__ import optimized_value

    logged = {"train/loss": 0.5, "val/loss": 0.2}
    assert optimized_value("train/loss", logged) == 0.5
    assert optimized_value(None, logged) == 0.2  # the default: the fixed validation loss
    assert optimized_value(None, {"train/loss": 0.5}) == 0.5
    with pytest.raises(SystemExit) as exit_:
        optimized_value("val/lss", logged)
    assert exit_.value.code == 2
    assert "optimized_metric='val/lss' was not logged by this run; logged: ['train/loss', 'val/loss']" in capsys.readouterr().err
    assert _compose("config", "hparams_search=optuna").optimized_metric == "val/loss"


def test_kolors_preset_is_the_seeds_baseline():
    cfg = _compose("config", "experiment=kolors_lora")
    assert (cfg.model.family, cfg.lora.rank, cfg.lora.alpha, cfg.trainer.precision) == ("kolors", 16, 4.0, "16-mixed")
    assert cfg.train.gradient_checkpointing and cfg.data.center_crop and cfg.trainer.max_epochs == 1
    assert "sdxl-vae-fp16-fix" in cfg.model.vae_path
    samples = cfg.callbacks.samples
    assert (samples.steps, samples.guidance, list(samples.scales), samples.columns) == (50, 4.0, [1.0], 2)
    assert [p.seed for p in samples.prompts] == [0, 1, 2, 5, 0, 1, 7, 0]
    assert all(p.prompt.startswith("二次元") and p.negative_prompt.startswith("丑陋、变形、嘈杂、模糊、低对比度")
               for p in samples.prompts)
    assert samples.prompts[3].negative_prompt.endswith("扭曲的手指,多余的手指")


def test_a_gpu_preset_on_a_cpu_ends_with_one_line(tmp_path):
    from tests.helpers.models import tiny_model

    proc = run_cli("experiment=kolors_lora", f"model.path={tiny_model('kolors')}", "model.vae_path=null",
                   f"data.root={QUICKSTART}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: trainer.accelerator=gpu (trainer=gpu, which the GPU presets such as experiment=kolors_lora use) " \
           "but this machine has no CUDA GPU. Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("script", "first", "keys"), [
    ("sdtune", "python -m sdtune [key=value ...]: train a LoRA", ["lora.rank", "data.root", "experiment: "]),
    ("sdtune-generate", "python -m sdtune.generate loras=[FILE@WEIGHT,...]", ["loras=[a.safetensors@0.7", "num_images: 4"]),
    ("sdtune-merge", "python -m sdtune.merge loras=[FILE@WEIGHT,...]", ["save_dtype: fp16", "single_file: null"]),
    ("sdtune-morph", "python -m sdtune.morph 'images=[a.png,b.png]'", ["inversion_steps: 50", "train_overrides: []"]),
    pytest.param("sdtune-export", "usage: python -m sdtune.export", ["--format {diffusers,kohya}", "--dora-as-lora"], marks=pytest.mark.slow),
    pytest.param("sdtune-report", "usage: python -m sdtune.report", ["--sort METRIC", "sweep"], marks=pytest.mark.slow),
])
def test_console_scripts_say_what_the_command_does_and_its_own_keys(script, first, keys, tmp_path):
    """pyproject's [project.scripts], run from another folder (the Hydra tools find conf/ by an
    absolute path, not relative to the working directory). The ``python -m`` forms run in the
    tests of each command."""
    proc = subprocess.run([str(Path(sys.executable).parent / script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(first), proc.stdout[:300] + proc.stderr[-2000:]
    assert all(k in proc.stdout for k in keys) and "powered by Hydra" not in proc.stdout
    if script in ("sdtune-generate", "sdtune-merge", "sdtune-morph"):  # their own keys, not training's groups
        assert "experiment:" not in proc.stdout and "lora.rank" not in proc.stdout and "\ntrainer:" not in proc.stdout


@pytest.mark.parametrize("preset", ["8gb", "12gb", "16gb", "24gb", "48gb"])
def test_hardware_presets_set_memory_knobs_per_family(preset):
    expected_batch = {"8gb": (2, 1), "12gb": (4, 1), "16gb": (8, 2), "24gb": (16, 4), "48gb": (32, 8)}[preset]
    for model, batch in zip(("sd15", "sdxl"), expected_batch):
        cfg = _compose("config", f"hardware={preset}", f"model={model}")
        _check(cfg)
        assert cfg.data.batch_size == batch and cfg.data.cache_latents and cfg.train.cache_text_embeddings
        assert cfg.train.gradient_checkpointing == (model == "sdxl" or preset == "8gb")
        assert cfg.optim.optimizer._target_.endswith("AdamW8bit") == (preset in ("8gb", "12gb"))
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "16-mixed"
    kolors = _compose("config", f"hardware={preset}", "model=kolors")
    if preset == "8gb":  # even in nf4 its samples need the UNet, ChatGLM and a 1024² decode together (9.12 GiB)
        with pytest.raises(Exception, match=r"hardware=8gb does not fit a kolors LoRA .*Fix: hardware=12gb"):
            validate(kolors)
    else:
        _check(kolors)  # ChatGLM-6B quantized where the plan needs it: nf4 at 12 GB, int8 at 16 GB
        assert kolors.model.quantize == {"12gb": "nf4", "16gb": "int8"}.get(preset)
        assert kolors.data.batch_size == {"12gb": 1, "16gb": 1, "24gb": 2, "48gb": 4}[preset]
    flux = _compose("config", f"hardware={preset}", "model=flux")
    assert flux.model.quantize == {"8gb": "nf4", "12gb": "nf4", "16gb": "nf4", "24gb": "int8"}.get(preset)


@pytest.mark.parametrize("app, overrides", [("generate", ["prompt=x"]), ("merge", ["out=x"]),
                                            ("morph", ["images=[a.png,b.png]"])])
def test_tools_write_into_their_own_output_folder(app, overrides):
    """hydra/default.yaml sets runs/<time> for training; each tool's own folder must win over it
    (its ``_self_`` comes after the hydra group), as README and the tools' help promise."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(app, overrides=overrides, return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"] == f"${{paths.output_root}}/{app}/${{now:%Y-%m-%d_%H-%M-%S}}"
