"""Main-job benchmark: `equiseg run` on the CC0 sample slide and on slides with more of its tissue.

For each tissue-area scale (1x is the sample slide itself; Nx tiles N mirrored copies of it into one slide)
and each executor (in-process, and a local Dask cluster with 2 workers), prints the seconds, seconds per mm²
of tissue and the peak resident memory of the run (each in a fresh process; for Dask, the largest process).
A slide must stream: memory must not grow with slide size, and time should grow at most linearly with area.

    python benchmarks/bench_run.py [--scales 1,4] [--executors local] [--target-mpp 1.0] [--keep DIR]
    python benchmarks/bench_run.py --scales 1,4,16 --executors local,dask   # the issue's scaling table
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from equiseg_wsi.options import DEFAULT_TARGET_MPP
from equiseg_wsi.slide import open_slide
from equiseg_wsi.testing.slide_writer import write_aperio_pyramid

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"

# Runs the command in a child and prints the child's peak RSS (kB on Linux) as the last line.
PEAK_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def mirrored_mosaic(side: int) -> tuple[np.ndarray, float]:
    """side x side copies of the CC0 region (mirrored so edges meet) as one RGB array, and its µm/px."""
    with open_slide(SAMPLE) as slide:
        rgb = slide.read_level(0, 0, 0, slide.width, slide.height)
        mpp = slide.mpp
    rows = []
    for r in range(side):
        row = [rgb[::-1] if r % 2 else rgb for _ in range(side)]
        row = [tile[:, ::-1] if c % 2 else tile for c, tile in enumerate(row)]
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)), mpp


def make_scaled_slide(path: Path, scale: int) -> None:
    """`scale` copies of the CC0 region side by side (mirrored so edges meet), written as a 3-level pyramid."""
    side = int(math.isqrt(scale))
    if side * side != scale:
        raise SystemExit("--scale must be a square number (1, 4, 9, 16, ...)")
    mosaic, mpp = mirrored_mosaic(side)
    write_aperio_pyramid(path, mosaic, mpp=mpp, n_levels=3)


def run_once(slide: Path, out: Path, target_mpp: float, executor: str) -> tuple[float, float, float]:
    """(seconds, tissue mm², peak RSS MiB) of one `equiseg run` in a fresh process."""
    cmd = [sys.executable, "-m", "equiseg_cli.main", "run", str(slide), "-o", str(out), "--quiet",
           "--device", "cpu", "--target-mpp", str(target_mpp), "--overwrite"]
    if executor == "dask":
        cmd += ["--workers", "2"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed on {slide}:\n{proc.stderr}")
    peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024
    manifest = json.loads((out / "manifest.json").read_text())
    tissue = sum(s["tissue_area_mm2"] for s in manifest["slides"])
    return seconds, tissue, peak_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1,4", help="tissue-area factors, square numbers (default 1,4)")
    parser.add_argument("--executors", default="local", help="local and/or dask (2 local workers)")
    parser.add_argument("--target-mpp", type=float, default=DEFAULT_TARGET_MPP,
                        help=f"µm/px the model sees (default {DEFAULT_TARGET_MPP:g}, the product's)")
    parser.add_argument("--keep", type=Path, default=None, help="keep slides and outputs in this folder")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="equiseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    scales = [int(v) for v in args.scales.split(",")]
    for executor in args.executors.split(","):
        rows = []
        for scale in scales:
            slide = SAMPLE if scale == 1 else work / f"cc0_x{scale}.svs"
            if not slide.exists():
                make_scaled_slide(slide, scale)
            seconds, mm2, peak = run_once(slide, work / f"out_{executor}_{scale}", args.target_mpp, executor)
            rows.append((scale, seconds, mm2, peak))
            print(f"{executor:>5} {scale:>3}x area: {seconds:7.1f} s, tissue {mm2:7.3f} mm², "
                  f"{seconds / mm2:6.1f} s/mm², peak RSS {peak:7.0f} MiB", flush=True)
        base = rows[0]
        for scale, seconds, mm2, peak in rows[1:]:
            print(f"{executor:>5} {scale}x vs {base[0]}x: time {seconds / base[1]:.2f}x for {mm2 / base[2]:.2f}x "
                  f"tissue; peak RSS {peak / base[3]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
