"""Cohort-fit benchmark: `equiseg fit` on N core images cut from the CC0 sample slide.

Makes N Gleason-style cores (circular crops 700-1000 px across at 0.499 µm/px, each rotated by a different
angle and pasted on white, like `sample_data/cores`), then times `equiseg fit` on them in a fresh process and
prints its wall time and peak resident memory. Fitting must stream: memory is one core's features plus
n_samples x 512 floats per core, so it should barely grow with N.

    python benchmarks/bench_fit.py [--cores 20] [--target-mpp 2.5] [--keep DIR]
    python benchmarks/bench_fit.py --cores 5,20     # compare peak memory for 5 and 20 cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from equiseg_wsi.slide import open_slide

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
MPP = 0.499

PEAK_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def make_cores(folder: Path, n: int, seed: int = 0) -> None:
    """`n` round cores from the tissue of the CC0 region, at random places and angles (seeded)."""
    with open_slide(SAMPLE) as slide:
        rgb = slide.read_level(0, 0, 0, slide.width, slide.height)
    rng = np.random.default_rng(seed)
    rows = ["path,slide,core,mpp"]
    for i in range(n):
        d = int(rng.integers(700, 1001))
        y = int(rng.integers(1000, rgb.shape[0] - d))  # the lower part of the region is mostly tissue
        x = int(rng.integers(300, rgb.shape[1] - d - 200))
        crop = Image.fromarray(rgb[y : y + d, x : x + d]).rotate(float(rng.uniform(0, 360)), Image.Resampling.BILINEAR,
                                                                  fillcolor=(255, 255, 255))
        yy, xx = np.mgrid[:d, :d]
        disc = (yy - d / 2) ** 2 + (xx - d / 2) ** 2 <= (d / 2 - 2) ** 2
        core = np.full((d + 100, d + 100, 3), 255, dtype=np.uint8)
        core[50 : 50 + d, 50 : 50 + d][disc] = np.asarray(crop)[disc]
        name = f"slide{i // 2 + 1:03d}_core{i % 2 + 1:03d}.jpg"
        Image.fromarray(core).save(folder / name, quality=90)
        rows.append(f"{name},slide{i // 2 + 1:03d},core{i % 2 + 1:03d},{MPP}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")


def fit_once(folder: Path, model: Path, target_mpp: float) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one `equiseg fit` in a fresh process."""
    cmd = [sys.executable, "-m", "equiseg_cli.main", "fit", str(folder), "-o", str(model), "--quiet",
           "--device", "cpu", "--target-mpp", str(target_mpp)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"equiseg fit failed: {done.stderr.strip() or done.stdout.strip()}")
    return seconds, int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="20", help="comma-separated core counts (default 20)")
    parser.add_argument("--target-mpp", type=float, default=2.5, help="µm/px the model sees (default 2.5)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the cores and models in this folder")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-fit-"))
    for n in [int(v) for v in args.cores.split(",")]:
        folder = base / f"cores{n}"
        folder.mkdir(parents=True, exist_ok=True)
        make_cores(folder, n)
        seconds, peak = fit_once(folder, base / f"model{n}.npz", args.target_mpp)
        print(f"{n} cores at {args.target_mpp} µm/px: fit {seconds:.1f} s ({seconds / n:.2f} s/core), "
              f"peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
