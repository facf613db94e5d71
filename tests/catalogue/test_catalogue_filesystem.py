"""Catalogue, filesystem: nothing we did not create is deleted, replaced or created; one run per
folder; unwritable and full disks give our message, and the files already written stay good."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file

from sdtune.families.builder import build_parts
from sdtune.families.tiny import ensure_tiny_model, in_tiny_cache
from sdtune.inference.loading import base_model_config, parse_loras
from sdtune.run.folder import LOCK_NAME
from sdtune.run.train import train
from sdtune.utils.errors import ConfigError, ModelLoadError, OutputError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_cfg
from tests.helpers.files import snapshot
from tests.helpers.paths import ROOT


@pytest.fixture
def victim(tmp_path):
    """A user's folder that happens to be named by a config or a LoRA header."""
    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(os.urandom(256))
    (folder / "notes.txt").write_text("years of work")
    return folder


def crafted_lora(path, model_path):
    """A LoRA file whose header claims a tiny model at ``model_path`` (anyone can write headers)."""
    cfg = {"model": {"family": "sd15", "path": str(model_path), "tiny": True, "resolution": 64}}
    meta = {"sdtune.config": json.dumps(cfg), "sdtune.family": "sd15"}
    import torch

    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.zeros(4, 32)}, str(path), metadata=meta)
    return path


def test_lora_header_cannot_make_generate_delete_a_folder(tmp_path, victim):
    """Route 1: the base model of generate/merge comes from the LoRA header, tiny flag included."""
    before = snapshot(victim)
    lora = crafted_lora(tmp_path / "downloaded.safetensors", victim)
    model_cfg = base_model_config(None, parse_loras([str(lora)]))
    with pytest.raises(ModelLoadError, match=r"Could not load the sd15 base model from model.path=.*my-model"):
        build_parts(model_cfg)
    assert snapshot(victim) == before


def test_lora_header_cannot_make_generate_create_a_folder(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    lora = crafted_lora(tmp_path / "downloaded.safetensors", missing)
    with pytest.raises(ModelLoadError, match=r"model.path=.*nowhere/model' does not exist"):
        build_parts(base_model_config(None, parse_loras([str(lora)])))
    assert not missing.exists() and not missing.parent.exists()


def test_quickstart_with_a_user_model_path_loads_it_and_never_replaces_it(tmp_path, victim):
    """Route 2: `experiment=quickstart model.path=/my/model` used to delete the folder and train a random model."""
    before = snapshot(victim)
    cfg = compose_cfg("experiment=quickstart", f"model.path={victim}", output_dir=tmp_path / "run")
    with pytest.raises(ModelLoadError, match=r"Could not load the sd15 base model from model.path=.*my-model"):
        train(cfg, tmp_path / "run")
    assert snapshot(victim) == before


def test_missing_model_path_is_not_created(tmp_path):
    missing = tmp_path / "typo" / "model"
    cfg = compose_cfg("experiment=quickstart", f"model.path={missing}", output_dir=tmp_path / "run")
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        train(cfg, tmp_path / "run")
    assert not missing.parent.exists()


def test_a_user_model_copied_from_a_tiny_build_is_loaded_not_rebuilt(tmp_path, tiny_sd15):
    """Outside the cache the tiny flag means nothing: a real diffusers folder there is used as is."""
    copy = tmp_path / "copied"
    shutil.copytree(tiny_sd15, copy)
    (copy / "sdtune_tiny.json").unlink()  # no marker: not ours
    before = snapshot(copy)
    family, parts = build_parts({"family": "sd15", "path": str(copy), "tiny": True})
    assert parts.unet.config.cross_attention_dim == 32 and snapshot(copy) == before


def test_a_foreign_folder_inside_the_cache_is_refused_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    foreign = tmp_path / "cache" / "tiny-sd15"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("not a tiny model")
    assert in_tiny_cache(foreign) and not in_tiny_cache(tmp_path / "cache" / ".." / "elsewhere")
    with pytest.raises(ModelLoadError, match=r"tiny-sd15 exists but was not built by sdtune .*Fix: move it away"):
        ensure_tiny_model("sd15", foreign)
    assert (foreign / "mine.txt").read_text() == "not a tiny model"


def test_two_runs_in_one_folder_the_second_names_the_first(tmp_path):
    """A live run holds the folder's lock; the second run stops before loading anything."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from sdtune.run.folder import run_folder_lock\n"
         "with run_folder_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = compose_cfg("experiment=quickstart", output_dir=run)
        with pytest.raises(ConfigError, match=rf"run folder .*run is in use by another sdtune run \(pid {holder.pid} on .*hydra.run.dir="):
            train(cfg, run)
        assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK_NAME).exists()  # a killed holder's lock is released by the kernel: the folder is usable


@pytest.mark.slow  # shares the quickstart run of the slow CLI tests (alone it pays ~15 s for it)
def test_a_new_run_on_top_of_a_finished_one_is_refused(quickstart_run, tmp_path):
    run = tmp_path / "again"
    shutil.copytree(quickstart_run, run)
    (run / LOCK_NAME).unlink()  # the old run's lock record; the new attempt writes its own
    before = snapshot(run)
    cfg = compose_cfg("experiment=quickstart", output_dir=run)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/.*ckpt.*Fix: resume that run with ckpt_path=last"):
        train(cfg, run)
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before and set(after) - set(before) <= {LOCK_NAME}


@pytest.fixture
def small_fs(tmp_path):
    """A real, small filesystem (tmpfs), so full-disk and read-only errors are the kernel's own."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_read_only_run_folder_is_our_error_before_any_model_loads(small_fs, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    cfg = compose_cfg("experiment=quickstart", output_dir=small_fs / "run")
    with pytest.raises(OutputError, match=r"cannot write to the run folder .*fs/run \(Read-only file system\).*Fix: choose a writable folder"):
        train(cfg, small_fs / "run")


@pytest.mark.slow
def test_full_disk_mid_run_is_our_error_and_the_last_checkpoint_stays_good(small_fs):
    """Once the first checkpoint is written the disk fills up: exit 2, our message, no half-written
    file, and every checkpoint left loads."""
    from sdtune.training.checkpointing import load_checkpoint

    run = small_fs / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtune", "experiment=quickstart", "callbacks.samples=null", "data.val_images=0",
         "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.max_steps=200", f"hydra.run.dir={run}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    first = run / "checkpoints" / "step000001.ckpt"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(small_fs / "filler", "wb") as fh:  # take every byte that is left
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "error: could not write" in err and "No space left on device" in err
    assert "resume with the same command plus ckpt_path=last" in err and "Traceback" not in err
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts and not list((run / "checkpoints").glob(".*"))  # no half-written file left
    assert all(load_checkpoint(c)["global_step"] >= 1 for c in ckpts)


def test_read_only_run_folder_on_the_command_line_is_exit_2_with_the_fix(small_fs):
    """Hydra makes the run folder before our code runs; the command checks it first."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    proc = run_cli("experiment=quickstart", f"hydra.run.dir={small_fs / 'run'}")
    assert proc.returncode == 2
    assert f"error: cannot write to the run folder {small_fs / 'run'} ({small_fs} is read-only" in proc.stderr
    assert "Fix: choose a writable folder with hydra.run.dir=" in proc.stderr and "Traceback" not in proc.stderr
