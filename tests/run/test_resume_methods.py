"""Exact resume with the training methods on together (issue 14): masked loss, DreamBooth prior
preservation, text-encoder LoRA and the EMA of the LoRA weights (exported), plus LoRA+. SIGKILL
mid-epoch, then ``ckpt_path=last`` gives the uninterrupted run's LoRA file and checkpoint bit for
bit on the CPU."""

from __future__ import annotations

import random
import shutil
import signal

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.families import get_family
from sdtune.toy.domain import random_scene, render
from sdtune.training.checkpointing import load_checkpoint
from tests.helpers.cli import kill_when_written, run_cli
from tests.helpers.paths import QUICKSTART

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


#: Per base: its overrides, and the key prefix of the text encoders' layers in its run's file.
#: tiny_sd35 is a flow-matching family: no noise offset (refused), two CLIP encoders with LoRA
#: (T5 gets none), and its run's file is in diffusers' layout; tiny_flux: CLIP-L only, a kohya file of
#: fused BFL names (its guidance input and 2x2 packing in every step).
MODELS = {
    "toy": (["train.noise_offset=0.05"], "lora_te_"),
    "tiny_sd35": (["model=tiny_sd35", "lora.targets=null"], "text_encoder_2."),
    "tiny_flux": (["model=tiny_flux", "lora.targets=null"], "lora_te1_"),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_sigkill_then_resume_with_every_method_on_is_bit_identical(tmp_path, data, model):
    """Catches class pairings or mask crops drawn from global random state (they would differ after
    the restart), and any method's state missing from the checkpoint: the text encoders' LoRA and
    its optimizer group, the EMA shadow tensors and step count."""
    root, classes = data
    extra, te_prefix = MODELS[model]
    args = ["experiment=quickstart", *extra, f"data.root={root}", f"data.class_root={classes}", "train.masked_loss=true",
            "trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=5", "callbacks.samples=null",
            "callbacks.concept_probe=null", "data.val_images=0", "data.random_flip=true", "data.center_crop=false",
            "data.caption_dropout=0.2",
            "lora.text_encoder={rank: 2, alpha: 4, lr: 1e-3}", "train.ema.enabled=true", "train.ema.decay=0.9",
            "train.ema.use_for_export=true", "optim.lora_plus_ratio=4"]
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
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith(te_prefix) for k in a)  # the text encoder's LoRA is in the file
    end, ref = load_checkpoint(run / "checkpoints" / "last.ckpt"), load_checkpoint(whole / "checkpoints" / "last.ckpt")
    assert end["global_step"] == ref["global_step"] == 12
    assert end["state_dict"].keys() == ref["state_dict"].keys()
    assert all(torch.equal(end["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])  # raw LoRA, denoiser + TE
    ema, ref_ema = end["sdtune"]["ema"], ref["sdtune"]["ema"]
    assert ema["optimization_step"] == ref_ema["optimization_step"] == 12
    assert all(torch.equal(x, y) for x, y in zip(ema["shadow_params"], ref_ema["shadow_params"], strict=True))
    attribute = f"{get_family(ref['hyper_parameters']['cfg']['model']['family']).denoiser_subfolder}."
    raw = {k.split(attribute, 1)[1].replace(".default", ""): v for k, v in ref["state_dict"].items() if k.startswith(attribute)}
    assert raw and any(not torch.equal(raw[n], s) for n, s in zip(ema["names"], ema["shadow_params"]))  # EMA != raw LoRA
    assert len(ref["optimizer_states"][0]["param_groups"]) == 3  # LoRA+ A, LoRA+ B, text encoder
    header = (whole / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/prior_loss" in header
