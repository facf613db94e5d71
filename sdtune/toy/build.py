"""``python -m sdtune.toy.build``: regenerate the committed toy base models from one seed.

    python -m sdtune.toy.build                       # all three families into models/toy/ (~27 min, 2 cores)
    python -m sdtune.toy.build --families sd15 --out /tmp/toy
    python -m sdtune.toy.build --check               # rebuild into a temporary folder, compare with models/toy/
    python -m sdtune.toy.build --rescore             # re-measure the committed models, rewrite the report only

Each ``models/toy/<family>/`` is a diffusers folder (fp16 safetensors) that ``model=toy``,
``model=toy_sdxl`` and ``model=toy_kolors`` load through the ordinary ``from_pretrained`` path.
``models/toy/REPORT.md`` records the recipe, the run time and the probe's accuracy per family,
and ``models/toy/<family>.png`` shows what each model draws for every palette prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sdtune.config.paths import ROOT
from sdtune.families import FAMILIES as REGISTRY
from sdtune.families import get_family
from sdtune.toy.evaluate import evaluate_pipeline
from sdtune.toy.objective_train import FLOW
from sdtune.toy.pretrain import Recipe, build_toy, encode_scenes, train_vae
from sdtune.toy.widen import widen_vae

#: Every registered family gets a toy base (built through the family interface alone).
FAMILIES = tuple(REGISTRY)
#: The report's headline figures are at the toy model configs' ``guidance`` (2); the sweep shows why.
GUIDANCE = 2.0
GUIDANCE_SWEEP = (1.0, 2.0, 4.0, 7.5)
TOY_ROOT = ROOT / "models" / "toy"
log = logging.getLogger("sdtune.toy")


def latent_channels(family_name: str) -> int:
    """Latent channels of ``family_name``'s VAE (4: SD's layout; 16: FLUX's and SD3's), read off its toy architecture."""
    from diffusers import AutoencoderKL

    with tempfile.TemporaryDirectory() as tmp:
        get_family(family_name).build_toy_folder(Path(tmp))
        return int(AutoencoderKL.load_config(Path(tmp) / "vae")["latent_channels"])


def committed_vae4(out: Path):
    """The 4-channel toy VAE of the first UNet toy folder in ``out`` (or :data:`TOY_ROOT`)."""
    from diffusers import AutoencoderKL

    for root in (out, TOY_ROOT):
        for name in FAMILIES:
            config = root / name / "vae" / "config.json"
            if config.is_file() and json.loads(config.read_text()).get("latent_channels") == 4:
                return AutoencoderKL.from_pretrained(config.parent, torch_dtype=torch.float32)
    raise FileNotFoundError(f"no 4-channel toy VAE under {out} or {TOY_ROOT}: the 16-channel one starts from it; "
                            "build a UNet toy first (python -m sdtune.toy.build --families sd15)")


def build_all(out: Path, families: tuple[str, ...], recipe: Recipe) -> dict:
    """Train one toy VAE per latent-channel count the ``families`` need, then each family's toy on it."""
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[int, list[str]] = {}
    for name in families:
        groups.setdefault(latent_channels(name), []).append(name)
    timings = {}
    start = time.perf_counter()
    vae4 = None
    for channels in sorted(groups):
        torch.set_num_threads(recipe.threads if channels == 4 else recipe.flow_threads)  # see Recipe
        clock = time.perf_counter()
        if channels == 4:
            vae = vae4 = train_vae(recipe, log.info)
        else:  # widened from the 4-channel VAE (sdtune.toy.widen): this run's, else the committed one
            init = widen_vae(vae4 if vae4 is not None else committed_vae4(out), channels, recipe.seed)
            vae = train_vae(recipe, log.info, latent_channels=channels, init=init)
        latents, captions = encode_scenes(vae, recipe)
        timings["vae" if channels == 4 else f"vae{channels}"] = round(time.perf_counter() - clock, 1)
        for name in groups[channels]:
            clock = time.perf_counter()
            build_toy(name, out / name, vae, latents, captions, recipe, log.info)
            timings[name] = round(time.perf_counter() - clock, 1)
    timings["total"] = round(time.perf_counter() - start, 1)
    return {"recipe": asdict(recipe), "seconds": timings, "torch": torch.__version__, **measure(out, families)}


def merge_results(old: dict, fresh: dict) -> dict:
    """``old``'s report with ``fresh``'s figures in: the families (and stages) not in ``fresh`` keep
    theirs; when ``fresh`` timed stages, ``total`` becomes the sum of all stages."""
    result = dict(old)
    for key, value in fresh.items():
        result[key] = {**old.get(key, {}), **value} if isinstance(value, dict) and key != "recipe" else value
    if "seconds" in fresh:
        stages = {k: v for k, v in result["seconds"].items() if k != "total"}
        result["seconds"] = {**stages, "total": round(sum(stages.values()), 1)}
    return result


def headline_guidance(family, parts) -> float:
    """The guidance of the report's headline figures: the embedded guidance a guidance-distilled
    denoiser (FLUX.1-dev's) was trained at, which its pipeline feeds the embedding instead of doing
    classifier-free guidance; else :data:`GUIDANCE`."""
    trained = getattr(family.objective(parts, {"flow": dict(FLOW)}), "guidance", None)
    return GUIDANCE if trained is None else float(trained)


def measure(out: Path, families: tuple[str, ...]) -> dict:
    """Probe accuracy of each built model at its :func:`headline_guidance` (and across
    :data:`GUIDANCE_SWEEP`), saving what it drew there as ``<family>.png``."""
    probe, sweep, headlines = {}, {}, {}
    for name in families:
        family = get_family(name)
        parts = family.load(str(out / name))
        pipe = family.build_pipeline(parts)
        pipe.set_progress_bar_config(disable=True)
        headline = headlines[name] = headline_guidance(family, parts)
        sweep[name] = {}
        for guidance in sorted({*GUIDANCE_SWEEP, headline}):
            score, grid = evaluate_pipeline(pipe, family, guidance=guidance, parts=parts)
            sweep[name][f"{guidance:g}"] = {"shape": score.shape, "colour": score.colour, "both": score.both}
            if guidance == headline:
                grid.save(out / f"{name}.png")
                probe[name] = sweep[name][f"{guidance:g}"]
        log.info("%s: probe shape %.0f%%, colour %.0f%% (guidance %g)", name, 100 * probe[name]["shape"],
                 100 * probe[name]["colour"], headline)
    return {"probe": probe, "guidance_sweep": sweep, "headline_guidance": headlines}


def compare(a: Path, b: Path) -> float:
    """Largest absolute difference between the weights of two toy folders."""
    from safetensors.torch import load_file

    worst = 0.0
    for file in sorted(a.rglob("*.safetensors")):
        ta, tb = load_file(str(file)), load_file(str(b / file.relative_to(a)))
        worst = max([worst] + [(ta[k].float() - tb[k].float()).abs().max().item() for k in ta])
    return worst


def write_report(out: Path, result: dict) -> None:
    lines = ["# Toy base models", "", "Built by `python -m sdtune.toy.build` "
             f"(torch {result['torch']}); seconds per stage: {json.dumps(result['seconds'])}.", "",
             "| family | guidance | probe: shape right | probe: colour right | both |", "|---|---|---|---|---|"]
    headlines = result.get("headline_guidance", {})
    for name, s in result["probe"].items():
        lines.append(f"| {name} | {headlines.get(name, GUIDANCE):g} | {s['shape']:.0%} | {s['colour']:.0%} | {s['both']:.0%} |")
    sweep = result.get("guidance_sweep", {})
    if sweep:
        scales = sorted({g for row in sweep.values() for g in row}, key=float)
        lines += ["", "Colour right / both right by guidance scale (why the UNet and SD3.5 toy model configs sample "
                  f"at `guidance: {GUIDANCE:g}`: past it, guidance overshoots the colours; FLUX's pipeline feeds the "
                  "scale to its guidance embedding instead of guiding, and the toy was trained at 1):", "",
                  "| family | " + " | ".join(f"guidance {g}" for g in scales) + " |", "|---|" + "---|" * len(scales)]
        for name, row in sweep.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{row[g]['colour']:.0%} / {row[g]['both']:.0%}" if g in row else "-" for g in scales) + " |")
    lines += [
        "", "The probe (`sdtune/toy/probe.py`) reads the shape and colour of every image drawn for the "
        "18 palette prompts (each shape in each colour, on a fixed other background) at seeds 0 and 1, "
        "20 sampling steps, at the guidance in the first table. `<family>.png` shows those images: one row per colour. "
        "Shape is the harder half: at 64 px the models round the corners of squares, and the probe's "
        "template fit calls most of those squares circles.", "",
        "What the models are: the real SD1.5 / SDXL / Kolors classes at toy size (64 px images, 8x8 "
        "latents); one VAE shared by all three; each UNet trained together with its text encoder(s) "
        "with v-prediction on DDPM's linear schedule (near-zero terminal SNR) and trailing timestep "
        "spacing. Why each choice: `sdtune/toy/pretrain.py`.", "",
        "The FLUX.1-dev and SD3.5 toys: the real FLUX / SD3 classes (transformer sizes in each family's "
        "`toy_denoiser`), on one 16-channel VAE (FLUX's and SD3's layout, with a latent shift) widened "
        "from the 4-channel one and fine-tuned (`sdtune/toy/widen.py`); each transformer trained with its "
        "text encoders by the family's own flow-matching objective and `predict` (uniform sigmas, the "
        "scheduler's shift; FLUX at a constant embedded guidance of 1, so it is sampled at 1 with no "
        "classifier-free guidance, as FLUX.1-dev is). Why: `sdtune/toy/objective_train.py`.", "",
        *[f"![{name}]({name}.png)" for name in result["probe"]], "",
        "Recipe:", "", "```json", json.dumps(result["recipe"], indent=2), "```", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.toy.build", description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--out", type=Path, default=TOY_ROOT)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                        help=f"families to build, space- or comma-separated (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare with --out")
    parser.add_argument("--rescore", action="store_true",
                        help="re-measure the models already in --out and rewrite its report (no training)")
    args = parser.parse_args(argv)
    args.families = [f for item in args.families for f in item.split(",") if f]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    recipe = Recipe(seed=args.seed)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            result = build_all(Path(tmp), tuple(args.families), recipe)
            diffs = {f: compare(args.out / f, Path(tmp) / f) for f in args.families}
        print(json.dumps({"max_abs_diff": diffs, "seconds": result["seconds"], "probe": result["probe"]}, indent=2))
        return 0
    if args.rescore:
        report = args.out / "report.json"
        if not report.is_file():
            parser.error(f"--rescore: {report} not found; build the models first (without --rescore)")
        result = merge_results(json.loads(report.read_text()), measure(args.out, tuple(args.families)))
        write_report(args.out, result)
        print(json.dumps({"probe": result["probe"]}, indent=2))
        return 0
    result = build_all(args.out, tuple(args.families), recipe)
    report = args.out / "report.json"
    if report.is_file():  # the families not built this time keep their figures
        result = merge_results(json.loads(report.read_text()), result)
    write_report(args.out, result)
    print(json.dumps({"seconds": result["seconds"], "probe": result["probe"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
