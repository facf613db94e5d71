"""Benchmark: time ``python -m data_pipeline`` on generated images (not a test).

``python -m data_pipeline.bench [--n 2000] [--np 2] [--recipe PATH]`` writes N small captioned
images (64-300 px, about 5% of them at 1024-1200 px so the default recipe keeps some, and a few
corrupt or empty files) into a temporary folder, runs the stage exactly as ``make data`` does
(a fresh process, so data-juicer's start-up is included) and prints the wall-clock seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.recipe import DEFAULT_RECIPE


def make_raw(root: Path, n: int, seed: int = 0) -> dict[str, int]:
    """N sidecar-captioned images in ``root``; returns how many of each kind were written."""
    rng = np.random.default_rng(seed)
    kinds = {"small": 0, "large": 0, "corrupt": 0, "empty": 0}
    for i in range(n):
        sub = root / f"part{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        name = sub / f"img{i:05d}.png"
        if i % 400 == 7:  # a real PNG cut in half
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(name)
            name.write_bytes(name.read_bytes()[: name.stat().st_size // 2])
            kinds["corrupt"] += 1
        elif i % 400 == 13:
            name.write_bytes(b"")
            kinds["empty"] += 1
        else:
            large = i % 20 == 3
            w, h = (rng.integers(1024, 1201, 2) if large else rng.integers(64, 301, 2)).tolist()
            grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR).save(name, compress_level=1)
            kinds["large" if large else "small"] += 1
        name.with_suffix(".txt").write_text(f"a generated picture number {i}", encoding="utf-8")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of raw images (default: %(default)s)")
    parser.add_argument("--np", type=int, default=2, help="worker processes (default: %(default)s)")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        clock = time.perf_counter()
        kinds = make_raw(raw, args.n)
        print(f"generated {args.n} images in {time.perf_counter() - clock:.1f} s: {kinds}")
        cmd = [sys.executable, "-m", "data_pipeline", str(raw), str(out), "--recipe", args.recipe, "--np", str(args.np)]
        clock = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - clock
        print(proc.stdout)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
    print(f"stage wall time: {seconds:.1f} s for {args.n} images (np={args.np}, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
