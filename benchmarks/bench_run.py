"""Main-job benchmark: `equiseg run` on the CC0 sample slide and on a slide with 4x its tissue area.

Prints seconds per mm² of tissue and the peak resident memory of each run (each in a fresh process), and
the ratio of the two peaks: a slide must stream, so memory must not grow with slide size.

    python benchmarks/bench_run.py [--scale 4] [--target-mpp 2.5] [--keep DIR]
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

from equiseg_wsi.slide import open_slide
from equiseg_wsi.slide_writer import write_aperio_pyramid

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"

# Runs the command in a child and prints the child's peak RSS (kB on Linux) as the last line.
PEAK_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def make_scaled_slide(path: Path, scale: int) -> None:
    """`scale` copies of the CC0 region side by side (mirrored so edges meet), written as a 3-level pyramid."""
    with open_slide(SAMPLE) as slide:
        rgb = slide.read_level(0, 0, 0, slide.width, slide.height)
        mpp = slide.mpp
    side = int(math.isqrt(scale))
    if side * side != scale:
        raise SystemExit("--scale must be a square number (1, 4, 9, 16, ...)")
    rows = []
    for r in range(side):
        row = [rgb[::-1] if r % 2 else rgb for _ in range(side)]
        row = [tile[:, ::-1] if c % 2 else tile for c, tile in enumerate(row)]
        rows.append(np.concatenate(row, axis=1))
    write_aperio_pyramid(path, np.ascontiguousarray(np.concatenate(rows, axis=0)), mpp=mpp, n_levels=3)


def run_once(slide: Path, out: Path, target_mpp: float) -> tuple[float, float, float]:
    """(seconds, tissue mm², peak RSS MiB) of one `equiseg run` in a fresh process."""
    cmd = [sys.executable, "-m", "equiseg_cli.main", "run", str(slide), "-o", str(out), "--quiet",
           "--device", "cpu", "--target-mpp", str(target_mpp), "--overwrite"]
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
    parser.add_argument("--scale", type=int, default=4, help="tissue-area factor of the large slide (square)")
    parser.add_argument("--target-mpp", type=float, default=2.5, help="µm/px the model sees (run's default)")
    parser.add_argument("--keep", type=Path, default=None, help="keep slides and outputs in this folder")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="equiseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    big = work / f"cc0_x{args.scale}.svs"
    if not big.exists():
        make_scaled_slide(big, args.scale)
    rows = []
    for name, slide in (("sample (1x)", SAMPLE), (f"{args.scale}x area", big)):
        seconds, mm2, peak = run_once(slide, work / f"out_{slide.stem}", args.target_mpp)
        rows.append((name, seconds, mm2, peak))
        print(f"{name:>12}: {seconds:7.1f} s, tissue {mm2:6.3f} mm², {seconds / mm2:6.1f} s/mm², "
              f"peak RSS {peak:7.0f} MiB", flush=True)
    print(f"time ratio {rows[1][1] / rows[0][1]:.2f}x for {rows[1][2] / rows[0][2]:.2f}x tissue; "
          f"peak RSS ratio: {rows[1][3] / rows[0][3]:.2f}x")


if __name__ == "__main__":
    main()
