"""Exact resume with masked loss and DreamBooth prior preservation on: SIGKILL mid-epoch, then
``ckpt_path=last`` gives the uninterrupted run's LoRA bit for bit (CPU)."""

from __future__ import annotations

import random
import shutil
import signal

import pytest
from PIL import Image
from safetensors.torch import load_file

from sdtune.toy.domain import random_scene, render

from .conftest import QUICKSTART, kill_when_written, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def data(tmp_path):
    """The quickstart images, 8 of 12 with a grey-level mask file, plus 5 captioned class images."""
    root = tmp_path / "data"
    shutil.copytree(QUICKSTART, root)
    rng = random.Random(0)
    for path in sorted((root / "images").glob("*.png"))[:8]:
        out = root / "masks" / "images" / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        mask = Image.new("L", Image.open(path).size, 0)
        mask.paste(rng.randint(60, 255), (rng.randint(0, 20), rng.randint(0, 20), rng.randint(40, 64), rng.randint(40, 64)))
        mask.save(out)
    classes = tmp_path / "classes"
    (classes / "images").mkdir(parents=True)
    rows = ["file_name,text"]
    for i in range(5):
        scene = random_scene(rng)
        render(scene).save(classes / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{scene.caption()}")
    (classes / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root, classes


def test_sigkill_then_resume_with_masked_loss_and_prior_preservation_is_bit_identical(tmp_path, data):
    """Catches class pairings or mask crops drawn from global random state (they would differ after
    the restart) and any of the two features' state missing from the checkpoint."""
    root, classes = data
    args = ["experiment=quickstart", f"data.root={root}", f"data.class_root={classes}", "train.masked_loss=true",
            "trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=5", "callbacks.samples=null",
            "callbacks.concept_probe=null", "data.val_images=0", "data.random_flip=true", "data.center_crop=false",
            "data.caption_dropout=0.2", "train.noise_offset=0.05"]
    whole = tmp_path / "whole"
    proc = run_cli(*args, f"hydra.run.dir={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 image(s) masked by a file under masks/, 0 by their alpha channel, 4 unmasked" in proc.stdout + proc.stderr

    run = tmp_path / "killed"
    code = kill_when_written([*args, f"hydra.run.dir={run}"], run / "checkpoints" / "step000005.ckpt")
    assert code == -signal.SIGKILL and not (run / "lora.safetensors").exists()
    resumed = run_cli(*args, f"hydra.run.dir={run}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(run / "lora.safetensors")), load_file(str(whole / "lora.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    header = (whole / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/prior_loss" in header
