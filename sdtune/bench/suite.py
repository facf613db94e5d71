"""One bench run: matmul peak, then per model its FLOP count and its cases, then the table.

Rounds interleave the cases (reference, sdtune without caches, sdtune with caches, reference, ...)
so that a slow minute on a shared machine hits every case alike; each case's steps from all
rounds are pooled and the median reported.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from sdtune.bench.cases import (
    REFERENCE,
    Case,
    cases_from_config,
    missing_requirements,
    models_to_run,
    plan_for,
    without_model,
)
from sdtune.bench.docs_rows import bench_row, write_row
from sdtune.bench.flops import count_step_flops
from sdtune.bench.measure import Timing, matmul_peak
from sdtune.bench.runner import first_batch, profile_case, run_case
from sdtune.bench.table import check_targets, make_row, to_console, to_csv, to_markdown
from sdtune.data.records import load_records
from sdtune.families import get_family
from sdtune.families.builder import model_source
from sdtune.inference.loading import pick_device
from sdtune.run.checks import validate
from sdtune.utils.errors import ConfigError
from sdtune.utils.io import write_text_atomic

log = logging.getLogger(__name__)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def environment() -> dict[str, str]:
    import diffusers
    import lightning
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "lightning": lightning.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _compose(overrides: Sequence[str]) -> dict[str, Any]:
    cfg = compose(config_name="bench", overrides=list(overrides))
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def model_folder(cfg: dict[str, Any], random_init: bool) -> str | None:
    """Where FLOP counting reads the architecture: a tiny/local diffusers folder, or None (shipped configs)."""
    if random_init:
        return None

    source = model_source(cfg["model"])
    denoiser = get_family(cfg["model"]["family"]).denoiser_subfolder
    return source if Path(source, denoiser, "config.json").is_file() else None


def bench_model(model: str, base: list[str], cases: list[Case], bench: dict[str, Any], device: torch.device,
                peak_flops: float, out_dir: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of one model, and the errors of cases that failed."""
    plan = plan_for(bench, device)
    random_init = bool(bench.get("random_init"))
    switches_here = model in (bench.get("switch_models") or [])
    cases = [c for c in cases if not c.switch or switches_here]
    cfgs, refused = {}, {}
    for c in cases:
        try:
            cfgs[c.name] = _compose([*base, f"model={model}", *c.overrides])
        except ConfigError as err:
            if not c.switch:
                raise
            refused[c.name] = f"refused for this family: {str(err).splitlines()[0]}"  # e.g. channels_last on FLUX
    first = cfgs[cases[0].name]
    cfgs.update({name: first for name in refused})  # the row's model, batch and resolution
    records = load_records(first["data"]["root"])
    flops = count_step_flops(first, first_batch(first, records), folder=model_folder(first, random_init))
    log.info("%s: %.4g GFLOP per image (fwd+bwd), %.4g fwd", model, flops["fwd_bwd"] / 1e9, flops["fwd"] / 1e9)

    timings = {c.name: Timing(batch_size=int(cfgs[c.name]["data"]["batch_size"])) for c in cases}
    skipped = {c.name: refused.get(c.name) or missing_requirements(c, device) for c in cases}
    errors: dict[str, str] = {}
    if plan.timed and bench.get("prime", True):
        # An untimed first pass: process-wide one-off costs (thread pools, kernel selection, lazy
        # imports) would otherwise land on whichever case happens to run first.
        prime = next(c for c in cases if not skipped[c.name])
        run_case(prime, cfgs[prime.name], records, device=device, warmup=0, steps=plan.warmup + 1,
                 random_init=random_init, root_dir=out_dir)
    for round_ in range(plan.rounds if plan.timed else 0):
        for case in cases if round_ % 2 == 0 else cases[::-1]:  # flipped order cancels drift
            if skipped[case.name] or case.name in errors:
                continue
            cap = case.rounds if case.rounds is not None else (bench.get("switch_rounds") if case.switch else None)
            if cap is not None and round_ >= int(cap):
                continue
            started = time.perf_counter()
            try:
                seconds, peak, method = run_case(
                    case, cfgs[case.name], records, device=device, warmup=plan.warmup + int(case.warmup or 0),
                    steps=plan.steps, random_init=random_init, root_dir=out_dir,
                )
            except Exception as err:  # one broken case must not hide the others' numbers
                log.exception("bench case %s/%s failed", model, case.name)
                errors[case.name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                continue
            timings[case.name].add(round_, seconds, peak, method)
            log.info("%s/%s round %d: median %.1f ms/step, peak %.0f MiB (%.1f s, load %.2f)", model, case.name,
                     round_ + 1, 1000 * statistics.median(seconds), peak, time.perf_counter() - started, os.getloadavg()[0])

    if plan.timed and bench.get("profile"):
        _profile(model, bench["profile"], cases, cfgs, records, device, plan, random_init, out_dir)
    rows = [_row(case, cfgs[case.name], model, device, plan, timings, skipped[case.name] or errors.get(case.name, ""),
                 skipped[case.name], flops, peak_flops) for case in cases]
    return rows, [f"{model}/{name}: {msg}" for name, msg in errors.items()]


def _profile(model, profile, cases, cfgs, records, device, plan, random_init, out_dir) -> None:
    """One more run of the case named ``profile`` under cProfile, into ``profile_<model>_<case>.txt``."""
    case = next((c for c in cases if c.name == profile), None)
    if case is None:
        raise ValueError(f"bench.profile={profile!r} is not one of the cases {[c.name for c in cases]}")
    out = out_dir / f"profile_{model}_{profile}.txt"
    profile_case(case, cfgs[profile], records, device=device, steps=plan.warmup + plan.steps,
                 random_init=random_init, root_dir=out_dir, out=out)
    log.info("wrote %s", out)


def _row(case, cfg, model, device, plan, timings, note, missing, flops, peak_flops) -> dict[str, str]:
    """The table row of one case: its timings, or why it has none (not timed here, missing, failed)."""
    meta = {"family": cfg["model"]["family"], "model": model, "device": device.type,
            "precision": cfg["trainer"]["precision"], "batch": cfg["data"]["batch_size"],
            "resolution": cfg["data"]["resolution"], "note": note}
    missing = missing or ""
    unavailable = (plan.reason if not plan.timed else "n/a (refused)" if missing.startswith("refused")
                   else "n/a (CUDA only)" if "CUDA" in missing else "n/a (not installed)" if missing else "error")
    return make_row(
        case=case, meta=meta, timing=timings[case.name], flops_per_image=flops["fwd_bwd"],
        fwd_flops_per_image=flops["fwd"], peak_flops=peak_flops,
        reference=timings.get(REFERENCE), baseline=timings.get(case.vs or ""), unavailable=unavailable,
    )


def quiet() -> None:
    """Keep the console to the bench's own lines: Lightning's per-fit banners and loading bars off."""
    import diffusers
    import transformers

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    for message in (r".*no `validation_step`.*", r".*LeafSpec.*", r".*does not have many workers.*",
                    r".*module\(s\) in eval mode.*", r".*pin_memory.*no accelerator.*"):
        warnings.filterwarnings("ignore", message=message)


def run_bench(cfg: DictConfig, task_overrides: Sequence[str], choices: dict[str, Any], out_dir: str | os.PathLike) -> int:
    """The whole bench; returns the process exit code (1 if a case failed)."""
    started = time.perf_counter()
    quiet()
    out_dir = Path(out_dir)
    bench = OmegaConf.to_container(cfg.bench, resolve=True)
    device = pick_device(str(cfg.trainer.accelerator))
    if bench.get("write_docs") and device.type != "cuda":
        raise ConfigError(f"bench.write_docs=true writes the GPU rows of {bench.get('docs_file')}, and this run is on "
                          f"{device.type}. Fix: run it on a CUDA machine (make bench-gpu), or drop bench.write_docs=true.")
    base = [o for o in without_model(task_overrides) if not o.lstrip("+~").startswith("hydra")]
    models = models_to_run(bench, task_overrides, str(choices.get("model")))
    cases = cases_from_config(bench)

    load = os.getloadavg()[0]
    if device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %.2f before the bench: other processes may be using this CPU, so step times "
                    "will be noisy (ratios pair cases within rounds, which helps but does not cure it)", load)
    peak = matmul_peak(device, size=bench["matmul"].get("size"), seconds=float(bench["matmul"].get("seconds", 1.0)))
    log.info("matmul peak on %s: %.1f GFLOP/s (%s)", device, peak["flops"] / 1e9, peak["dtype"])
    rows, errors = [], []
    for model in models:
        model_rows, model_errors = bench_model(model, base, cases, bench, device, peak["flops"], out_dir)
        rows += model_rows
        errors += model_errors

    targets = check_targets(rows, bench.get("targets") or [])
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m sdtune.bench " + " ".join(task_overrides),
        "device": describe_device(device),
        "matmul_peak_gflops": round(peak["flops"] / 1e9, 2),
        "matmul": {"dtype": peak["dtype"], "size": peak["size"]},
        "memory": "CUDA max_memory_allocated over the training loop" if device.type == "cuda" else
                  "peak RSS over the training loop minus RSS before the case (VmHWM after clear_refs)",
        "flops": "FlopCounterMode on the meta device: UNet fwd+bwd per image, frozen base + LoRA",
        "versions": environment(),
        "targets": targets,
        "errors": errors,
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)},
    }
    write_text_atomic(out_dir / "bench.csv", to_csv(rows))
    write_text_atomic(out_dir / "bench.md", to_markdown(rows))
    write_text_atomic(out_dir / "bench.json", json.dumps(info, indent=2) + "\n")
    if bench.get("write_docs"):
        row = bench_row(str(choices.get("bench/preset")), bench, rows, info)
        write_row(bench["docs_file"], row)
        log.info("wrote the %s row of %s", row["preset"], bench["docs_file"])

    print(f"\nsdtune bench  {info['date']}  {info['device']}  matmul peak {info['matmul_peak_gflops']} GFLOP/s "
          f"({peak['dtype']})  torch {info['versions']['torch']}")
    print(to_console(rows))
    for line in targets:
        print("target:", line)
    for line in errors:
        print("error:", line)
    print(f"wrote {out_dir / 'bench.csv'} ({info['wall_s']} s)")
    return 1 if errors else 0
