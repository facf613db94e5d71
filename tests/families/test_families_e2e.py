"""`python -m sdtune model=tiny_sdxl|tiny_kolors experiment=quickstart`, loaded back by diffusers."""

from __future__ import annotations

import diffusers
import pytest
import torch

from sdtune.families import get_family
from sdtune.lora.apply import apply_lora
from sdtune.lora.files import read_lora
from tests.helpers.cli import run_cli
from tests.helpers.models import tiny_model, unet_inputs

pytestmark = pytest.mark.slow

PIPELINE = {"sdxl": diffusers.StableDiffusionXLPipeline, "kolors": diffusers.KolorsPipeline}


@pytest.fixture(scope="module", params=["sdxl", "kolors"])
def family_run(request, tmp_path_factory):
    family = request.param
    tiny_model(family)
    run_dir = tmp_path_factory.mktemp(family) / "run"
    proc = run_cli(f"model=tiny_{family}", "experiment=quickstart", "lora.alpha=2", "trainer.max_steps=20",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return family, run_dir


def test_run_writes_lora_and_samples(family_run):
    family, run_dir = family_run
    assert (run_dir / "samples.png").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    lora = read_lora(run_dir / "lora.safetensors")
    assert lora.family == family and (lora.spec.rank, lora.spec.alpha) == (4, 2.0)
    assert lora.metadata["sdtune.resolution"] == "64"
    assert lora.metadata["ss_base_model_version"] == get_family(family).base_model_version


def test_family_pipeline_loads_the_lora_like_our_unet(family_run):
    family, run_dir = family_run
    path = run_dir / "lora.safetensors"
    pipe = PIPELINE[family].from_pretrained(tiny_model(family))
    x, t, kw = unet_inputs(family)
    with torch.no_grad():
        base = pipe.unet(x, t, **kw).sample
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(x, t, **kw).sample
    lora = read_lora(path)
    parts = get_family(family).load(str(tiny_model(family)))
    apply_lora(parts, lora, family=family, path=path, adapter_name="default")  # every key must match
    with torch.no_grad():
        ours = parts.unet.eval()(x, t, **kw).sample
    assert (theirs - base).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
