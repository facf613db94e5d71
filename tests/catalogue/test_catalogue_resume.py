"""Catalogue, resume: epoch-limited runs resume exactly (at an epoch boundary and mid-epoch), and a
checkpoint that is broken, non-finite or made on other data is refused with our message."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sdtune.run.train import train
from sdtune.training.checkpointing import load_checkpoint
from sdtune.utils.errors import ConfigError, LoraFileError
from tests.helpers.config import compose_cfg
from tests.helpers.files import snapshot
from tests.helpers.paths import QUICKSTART, ROOT

pytestmark = pytest.mark.slow
# 12 images, batch 4: 3 batches an epoch; flips and caption dropout make every epoch's draws differ.
EPOCHS = ["experiment=quickstart", "callbacks.samples=null", "data.val_images=0", "data.random_flip=true",
          "data.caption_dropout=0.2", "trainer.max_steps=-1", "trainer.max_epochs=4"]


def lora_diff(a, b) -> float:
    ta, tb = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def fit(run, *overrides):
    train(compose_cfg(*EPOCHS, *overrides, output_dir=run), run)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    fit(run, "callbacks.model_checkpoint.every_n_train_steps=1")  # a checkpoint of every step, for comparisons
    return run


def kill_after(run, checkpoint: str, *overrides) -> int:
    """Start a real run, SIGKILL it once ``checkpoint`` exists; the step it is resumable from."""
    proc = subprocess.Popen([sys.executable, "-m", "sdtune", *EPOCHS, *overrides, f"hydra.run.dir={run}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run / "checkpoints" / checkpoint
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.exists() and not (run / "lora.safetensors").exists()
    return max(load_checkpoint(c)["global_step"] for c in (run / "checkpoints").glob("*.ckpt"))


def test_sigkill_at_an_epoch_boundary_resumes_bit_identically(whole, tmp_path):
    """Every checkpoint here falls on an epoch's last batch (3 batches, one every 3 steps)."""
    run = tmp_path / "run"
    at = kill_after(run, "step000006.ckpt", "callbacks.model_checkpoint.every_n_train_steps=3")
    assert at % 3 == 0 and at < 12
    fit(run, "callbacks.model_checkpoint.every_n_train_steps=3", "ckpt_path=last")
    assert lora_diff(run, whole) == 0.0
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 12  # no epoch lost (was 9)


def test_sigkill_mid_epoch_with_an_epoch_limit_resumes_bit_identically(whole, tmp_path):
    run = tmp_path / "run"
    at = kill_after(run, "step000005.ckpt", "callbacks.model_checkpoint.every_n_train_steps=5")
    assert at % 3 != 0
    fit(run, "callbacks.model_checkpoint.every_n_train_steps=5", "ckpt_path=last")
    assert lora_diff(run, whole) == 0.0


def test_extending_max_epochs_on_resume_equals_one_longer_run(whole, tmp_path):
    run = tmp_path / "run"
    fit(run, "trainer.max_epochs=2")
    fit(run, "ckpt_path=last")  # max_epochs=4 now
    assert lora_diff(run, whole) == 0.0


def test_mixed_step_and_epoch_limits_resume_to_the_same_step(whole, tmp_path):
    """max_steps=8 binds before max_epochs=4; kill at 5, resume, and match step 8 of the long run."""
    run = tmp_path / "run"
    kill_after(run, "step000005.ckpt", "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.max_steps=8")
    fit(run, "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.max_steps=8", "ckpt_path=last")
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")
    step8 = load_checkpoint(whole / "checkpoints" / "step000008.ckpt")
    assert final["global_step"] == step8["global_step"] == 8
    assert final["state_dict"].keys() == step8["state_dict"].keys()
    assert all(torch.equal(final["state_dict"][k], step8["state_dict"][k]) for k in final["state_dict"])


def broken_copy(whole, tmp_path, edit):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    target = run / "checkpoints" / "last.ckpt"
    shutil.copy(whole / "checkpoints" / "last.ckpt", target)
    edit(target)
    return run, target


def _nan_weight(path):
    ckpt = torch.load(path, weights_only=True)
    key = sorted(k for k in ckpt["state_dict"] if "lora_B" in k)[0]
    ckpt["state_dict"][key][0, :3] = float("nan")
    torch.save(ckpt, path)


def _nan_moment(path):
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer_states"][0]["state"][0]["exp_avg_sq"].fill_(float("inf"))
    torch.save(ckpt, path)


@pytest.mark.parametrize(("edit", "error", "message"), [
    (_nan_weight, LoraFileError, r"last.ckpt' holds non-finite values: 1 tensor\(s\), 3 value\(s\).*lora_B"),
    (_nan_moment, LoraFileError, r"last.ckpt' holds non-finite values: 1 tensor\(s\).*optimizer\[0\].state\[0\].exp_avg_sq"),
    (lambda p: p.write_bytes(b""), LoraFileError, r"last.ckpt' is not a readable"),
    (lambda p: shutil.copy(QUICKSTART / "images" / "sks_00_red_circle.png", p), LoraFileError, r"last.ckpt' is not a"),
])
def test_broken_or_non_finite_checkpoint_is_refused_on_resume(whole, tmp_path, edit, error, message):
    run, target = broken_copy(whole, tmp_path, edit)
    before = target.read_bytes()
    with pytest.raises(error, match=message) as info:
        fit(run, "ckpt_path=last")
    assert "weights_only" not in str(info.value)  # never PyTorch's advice to unpickle untrusted files
    assert target.read_bytes() == before and not (run / "lora.safetensors").exists()


@pytest.fixture
def data_copy(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(QUICKSTART, root)
    return root


@pytest.mark.parametrize(("change", "message"), [
    (lambda root: (root / "images" / "sks_00_red_circle.png").unlink() or _drop_row(root, "sks_00_red_circle"),
     r"12 images then, 11 now: 1 removed \(e.g. images/sks_00_red_circle.png\)"),
    (lambda root: _edit_caption(root), r"12 images then, 12 now: 1 with a new caption \(e.g. images/sks_01_red_square.png\)"),
])
def test_resume_on_changed_data_is_refused_unless_allowed(whole, tmp_path, data_copy, change, message):
    run = tmp_path / "run"
    shutil.copytree(whole / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "last.ckpt").touch()  # the newest
    fit_args = [f"data.root={data_copy}", "ckpt_path=last"]
    # the checkpoint was made on the bundled set; the same files in another folder are the same data
    change(data_copy)
    before = snapshot(data_copy)
    with pytest.raises(ConfigError, match=rf"cannot resume from .*last.ckpt: the dataset changed since it was written \({message}.*resume.allow_data_change=true"):
        fit(run, *fit_args)
    assert snapshot(data_copy) == before
    fit(run, *fit_args, "resume.allow_data_change=true", "trainer.max_epochs=5")
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] > 12


def _drop_row(root, stem):
    meta = root / "metadata.csv"
    meta.write_text("".join(line for line in meta.read_text().splitlines(keepends=True) if stem not in line))


def _edit_caption(root):
    meta = root / "metadata.csv"
    lines = meta.read_text().splitlines(keepends=True)
    lines = [line.replace(",", ",(edited) ", 1) if "sks_01_red_square" in line else line for line in lines]
    meta.write_text("".join(lines))
