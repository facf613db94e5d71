"""``python -m sdtune.bench.startup``: CPU seconds from the command to a finished first training step.

Two commands on the same tiny SD1.5 folder, interleaved ``--runs`` times, each in a fresh process:

* ``sdtune``: ``python -m sdtune model=tiny data.root=examples/quickstart trainer=cpu
  trainer.max_steps=1 ~callbacks ~logger``: start-up (config, data checks, text cache)
  plus one step;
* ``plain``: what diffusers' example script does before its first step (import torch, diffusers,
  transformers and peft, load the parts with ``from_pretrained``, add LoRA, one step), written out
  in :data:`PLAIN`;
* ``plain + import lightning``: the same script importing Lightning first. Lightning's import
  (torchmetrics, and through it matplotlib and scipy.signal when installed) is a cost any
  Lightning-based trainer pays before its first line runs; this row shows that floor, and the
  ratio against it is what sdtune's own start-up (Hydra, config checks, data checks, caches) adds.

CPU seconds (user + system of the child, from ``resource``) are what a 2-core machine pays;
wall time follows them. The table gives the median of each and the ratio sdtune / plain.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sdtune.config.paths import ROOT
from sdtune.families.sd15 import SD15
from sdtune.families.tiny import ensure_tiny_model, tiny_cache_root

PLAIN = """
import sys, torch, torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from peft import LoraConfig
path = sys.argv[1]
tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
for m in (te, vae, unet):
    m.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
pixels = torch.rand(4, 3, 64, 64) * 2 - 1
ids = tok(["a red circle on a sks background"] * 4, padding="max_length", max_length=tok.model_max_length,
          truncation=True, return_tensors="pt").input_ids
with torch.no_grad():
    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    text = te(ids)[0]
noise = torch.randn_like(latents)
t = torch.randint(0, sched.config.num_train_timesteps, (4,))
pred = unet(sched.add_noise(latents, noise, t), t, text).sample
loss = F.mse_loss(pred, noise)
loss.backward()
opt.step()
"""

LIGHTNING = "plain + import lightning"


def cpu_seconds(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child process, which must succeed."""
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{proc.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.bench.startup", description=__doc__.partition("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    folder = ensure_tiny_model(SD15.name, tiny_cache_root() / f"tiny-{SD15.name}")  # what model=tiny loads; PLAIN is SD1.5's
    results: dict[str, list[tuple[float, float]]] = {"plain": [], LIGHTNING: [], "sdtune": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "plain.py"
        script.write_text(PLAIN)
        with_lightning = Path(tmp) / "plain_lightning.py"
        with_lightning.write_text("import lightning\n" + PLAIN)
        for i in range(args.runs):
            results["plain"].append(cpu_seconds([sys.executable, str(script), str(folder)], ROOT))
            results[LIGHTNING].append(cpu_seconds([sys.executable, str(with_lightning), str(folder)], ROOT))
            results["sdtune"].append(cpu_seconds([
                sys.executable, "-m", "sdtune", "model=tiny", f"data.root={ROOT / 'examples' / 'quickstart'}",
                "trainer=cpu", "trainer.max_steps=1", "data.batch_size=4", "~callbacks", "~logger",
                f"hydra.run.dir={tmp}/run{i}"], ROOT))
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in results.items()}
    print(f"start-up to one finished step, median of {args.runs} interleaved runs (tiny SD1.5):")
    print("| command | CPU s | wall s |\n|---|---|---|")
    for name, (cpu, wall) in med.items():
        print(f"| {name} | {cpu:.2f} | {wall:.2f} |")
    for base in ("plain", LIGHTNING):
        print(f"sdtune / {base}: {med['sdtune'][0] / med[base][0]:.2f}x CPU, {med['sdtune'][1] / med[base][1]:.2f}x wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
