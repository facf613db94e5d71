"""A toy ControlNet for the tests and the docs picture (docs/tools.md), and the picture itself.

    python -m sdtune.toy.controlnet --out /tmp/toy-controlnet           # a ControlNet folder for models/toy/sd15
    python -m sdtune.toy.controlnet --picture docs/images/img2img_toy.png

:func:`build_toy_controlnet` is diffusers' own recipe for a new ControlNet, ``ControlNetModel.from_unet``
(a copy of the base UNet's encoder plus a conditioning embedding whose (16, 32, 96, 256) channels
downscale the control picture 8x, the VAE's factor), saved with ``save_pretrained`` and so loaded
like a real one. A fresh ControlNet is a no-op by design (its output convs start at zero), so
they get small seeded random weights: untrained, it follows no edges, but the conditioning scale
visibly changes the picture, which is what the tests and the picture need to show.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sdtune.config.paths import ROOT
from sdtune.inference.sampling import make_grid
from sdtune.toy.domain import Scene, render
from sdtune.utils.io import save_image_atomic

#: The toy base of the docs picture (docs/tools.md) and its prompt and input scene.
PICTURE_BASE = "models/toy/sd15"
PICTURE_PROMPT = "a red circle on a blue background"
PICTURE_STRENGTHS = (0.0, 0.3, 0.6, 0.9)
PICTURE_SCALES = (0.0, 0.5, 1.0)


def build_toy_controlnet(base: str | Path, out: str | Path, *, seed: int = 0, std: float = 0.2) -> Path:
    """Save a ControlNet made from ``base``'s UNet (a diffusers model folder) to ``out``; its zero
    convs get seeded normal weights of ``std``. SD1.5 and SDXL bases (the UNet's own layout).
    The same ``seed`` gives the same weights, byte for byte."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet", torch_dtype=torch.float32)
    with torch.random.fork_rng():  # the conditioning embedding's own layers start random: seed them too
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
    controlnet.save_pretrained(str(out))
    return Path(out)


def input_scene(side: int = 64):
    """The picture docs/tools.md shows: a green square on a yellow ground (the prompt asks for a red circle on blue)."""
    return render(Scene("square", "green", "yellow", size=0.3), side=side)


def make_picture(target: str | Path, *, steps: int = 20) -> Path:
    """docs/images/img2img_toy.png: the input, its Canny map, then the toy sd15 base's img2img at a
    few strengths, one row per ControlNet conditioning scale (seed 0, guidance 2). Every tile is
    drawn by the ``python -m sdtune.generate`` command itself (one Hydra sweep over strength and
    scale, in a child process: toy/ sits below the commands and imports none of them), so the
    picture shows what the command does."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "input.png"
        input_scene().save(source)
        controlnet = build_toy_controlnet(ROOT / PICTURE_BASE, tmp / "controlnet")
        sweep = tmp / "sweep"
        subprocess.run([
            sys.executable, "-m", "sdtune.generate", "-m", "model=toy", f"prompt={PICTURE_PROMPT}", "num_images=1",
            f"steps={steps}", f"init_image={source}", f"strength={','.join(map(str, PICTURE_STRENGTHS))}",
            f"controlnet.path={controlnet}", f"controlnet.conditioning_scale={','.join(map(str, PICTURE_SCALES))}",
            "device=cpu", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${controlnet.conditioning_scale}_${strength}",
        ], cwd=ROOT, check=True)
        rows, labels = [], []
        for scale in PICTURE_SCALES:
            tiles = [sweep / f"{scale}_{strength}" for strength in PICTURE_STRENGTHS]
            control = Image.open(tiles[-1] / "control.png").convert("RGB")
            rows.append([Image.open(source).convert("RGB"), control,
                         *(Image.open(t / "seed0.png").convert("RGB") for t in tiles)])
            labels.append(f"ControlNet {scale:g}")
    grid = make_grid(rows, labels, ["input", "canny", *(f"strength {s:g}" for s in PICTURE_STRENGTHS)], min_tile=96)
    save_image_atomic(grid, target)
    return Path(target)


def default_base() -> Path:
    """The toy sd15 base, found from this package's own location (so the command works from any folder)."""
    return ROOT / PICTURE_BASE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdtune.toy.controlnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(default_base()),
                        help="--out's base: a diffusers SD1.5/SDXL folder (default: the toy sd15 base, %(default)s)")
    parser.add_argument("--out", help="write the toy ControlNet folder here")
    parser.add_argument("--picture", help="write the docs img2img/ControlNet picture here (on the toy sd15 base)")
    args = parser.parse_args(argv)
    if not (args.out or args.picture):
        parser.error("give --out and/or --picture")
    if args.out:
        if not (Path(args.base) / "unet" / "config.json").is_file():
            parser.error(f"--base {args.base!r} is not a diffusers model folder with a unet/ subfolder. Fix: point "
                         f"--base at an SD1.5/SDXL diffusers folder, or leave it out for {default_base()}.")
        print(build_toy_controlnet(args.base, args.out))
    if args.picture:
        print(make_picture(args.picture))


if __name__ == "__main__":
    main()
