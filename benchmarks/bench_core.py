"""End-to-end time of `equiseg run` on one Gleason-size TMA core (1.3 mm across, a JPEG at 0.25 µm/px).

Two cores, each written as a 5,200 px JPEG like the Gleason 2019 cores: `cc0` (default) is made from the CC0
sample region (four mirrored copies side by side, enlarged 2x to 0.25 µm/px, a 1.3-mm disc of it on white: about
0.5 mm² of tissue); `full` is a disc filled with tissue, a 6 x 6 mosaic of EBHI-Seg colon tiles (about 1 µm/px,
``../shared/data/ebhi_seg``) enlarged 4x (1.33 mm² of tissue, like most Gleason cores). Each is segmented with
`equiseg run CORE --mpp 0.25` in a fresh process per repeat (so the times include starting Python, importing
PyTorch and reading the JPEG). Prints wall seconds per core, the run's own per-stage seconds from the manifest,
and seconds per mm² of tissue, at the defaults and at any `--variant` options.

    python benchmarks/bench_core.py [--core cc0|full] [--repeats 3] [--variant "--target-mpp 2.5"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import mirrored_mosaic  # noqa: E402

CORE_MM = 1.3
CORE_MPP = 0.25


EBHI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ebhi_seg"


def ebhi_mosaic() -> tuple[np.ndarray, float]:
    """A 6 x 6 mosaic of EBHI-Seg tiles (every 7th of the manifest), about 1 µm/px."""
    import csv

    with open(EBHI / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[::7][:36]
    tiles = [np.asarray(Image.open(EBHI / r["image"]).convert("RGB")) for r in rows]
    return np.concatenate([np.concatenate(tiles[i * 6 : (i + 1) * 6], axis=1) for i in range(6)], axis=0), 1.0


def make_core(path: Path, kind: str = "cc0") -> float:
    """Write the core JPEG; returns its disc area in mm²."""
    mosaic, mpp = mirrored_mosaic(2) if kind == "cc0" else ebhi_mosaic()
    scale = mpp / CORE_MPP
    big = Image.fromarray(np.ascontiguousarray(mosaic)).resize(
        (round(mosaic.shape[1] * scale), round(mosaic.shape[0] * scale)), Image.Resampling.BILINEAR)
    side = round(CORE_MM * 1000 / CORE_MPP)
    crop = np.asarray(big)[:side, :side]
    if crop.shape[:2] != (side, side):
        raise SystemExit(f"the mosaic is smaller than a {side} px core")
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
    out = np.where(disc[..., None], crop, 245).astype(np.uint8)
    Image.fromarray(out).save(path, quality=90)
    return float(disc.sum()) * (CORE_MPP / 1000) ** 2


def run_once(core: Path, out: Path, options: list[str]) -> tuple[float, dict[str, float], float]:
    cmd = [sys.executable, "-m", "equiseg_cli.main", "run", str(core), "-o", str(out), "--quiet", "--overwrite",
           "--mpp", str(CORE_MPP), "--device", "cpu", *options]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"equiseg run failed: {shlex.join(cmd)}\n{proc.stderr}")
    slide = json.loads((out / "manifest.json").read_text())["slides"][0]
    return wall, {k: float(v) for k, v in slide.get("seconds", {}).items()}, float(slide["tissue_area_mm2"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--core", choices=("cc0", "full"), default="cc0",
                   help="cc0: CC0 skin tissue, about 0.5 mm² in the disc; full: the disc full of EBHI-Seg tissue")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per setting (default 3)")
    p.add_argument("--variant", action="append", default=[], help="extra `equiseg run` options (repeatable)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="equiseg-bench-core-") as tmp:
        core = Path(tmp) / "core.jpg"
        if args.core == "full" and not (EBHI / "manifest.csv").is_file():
            print(f"{EBHI} not found: the full-tissue core needs ../shared/data/ebhi_seg; nothing measured")
            return
        disc_mm2 = make_core(core, args.core)
        print(f"core: {CORE_MM} mm across ({disc_mm2:.2f} mm² disc), {CORE_MPP} µm/px JPEG, "
              f"{core.stat().st_size / 1e6:.1f} MB")
        for options in ["", *args.variant]:
            walls, stages, tissue = [], {}, 0.0
            for i in range(args.repeats):
                wall, stages, tissue = run_once(core, Path(tmp) / f"out{i}", shlex.split(options))
                walls.append(wall)
            inner = ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
            print(f"[{options or 'defaults'}] wall {min(walls):.2f}-{max(walls):.2f} s per core "
                  f"(median {float(np.median(walls)):.2f}); tissue {tissue:.2f} mm², "
                  f"{float(np.median(walls)) / tissue:.2f} s/mm²; last run's stages: {inner}")


if __name__ == "__main__":
    main()
