"""How many TMA cores `dearray` gets right on synthetic TMAs with partly filled cores (issue 17).

Slides from the project's generator (`equiseg_wsi.testing.tma_synth`), like the issue's hold-outs: 8 x 5 rotated
4° with 5 missing, 6 x 4 rotated -9° with 3 missing, 12 x 8 rotated 5° with 19 missing; each with half-moon
cores, cores cut by a straight edge, sparse patchy cores, a fragmented core and debris; one slide per seed. A
core is right when its name and grid position match, it is present or missing as in the truth, and (if present)
its centre is within 10% of its punch diameter. Prints per slide the misses, then the totals and worst errors.

    python benchmarks/bench_tma_partial.py [--seeds 1,2,3,4,5,6,7]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from equiseg_wsi.slide import open_slide
from equiseg_wsi.testing.tma_synth import make_tma_slide
from equiseg_wsi.tissue import detect_tissue
from equiseg_wsi.tma import dearray

CASES = {
    "8x5": dict(rows=5, cols=8, mpp=4.0, rotation_deg=4.0, missing=0.125, n_half=2, n_cut=2, n_sparse=1,
                n_debris=8, n_fragmented=1),
    "6x4": dict(rows=4, cols=6, mpp=4.0, rotation_deg=-9.0, missing=0.125, n_half=1, n_cut=1, n_sparse=1,
                n_debris=6, n_fragmented=1),
    "12x8": dict(rows=8, cols=12, mpp=6.0, rotation_deg=5.0, missing=0.2, n_half=3, n_cut=3, n_sparse=2,
                 n_debris=12, n_fragmented=1),
}
TOL = 0.10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3,4,5,6,7", help="comma-separated generator seeds")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    total = right = partial = partial_right = 0
    errors: list[tuple[float, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, kw in CASES.items():
            for seed in seeds:
                truth = make_tma_slide(Path(tmp) / f"{case}_{seed}.svs", seed=seed, **kw)  # type: ignore[arg-type]
                with open_slide(truth.path) as slide:
                    grid = dearray(detect_tissue(slide, 8.0))
                same = (grid.n_rows, grid.n_cols) == (truth.n_rows, truth.n_cols)
                misses = []
                for t in truth.cores:
                    g = next((c for c in grid.cores if c.name == t.name), None)
                    ok = g is not None and same and (g.row, g.col, g.present) == (t.row, t.col, t.present)
                    if ok and g is not None and t.present:
                        err = math.dist(g.centre_level0, t.centre_level0) * truth.mpp / t.diameter_um
                        errors.append((err, f"{case} seed {seed} {t.name}", t.partial or "whole"))
                        ok = err <= TOL
                    total += 1
                    right += ok
                    partial += bool(t.partial)
                    partial_right += bool(t.partial) and ok
                    if not ok:
                        misses.append(f"{t.name} ({t.partial or 'whole'}, {'present' if t.present else 'missing'})")
                print(f"{case} seed {seed}: {len(truth.cores) - len(misses)}/{len(truth.cores)} right"
                      + (f"; misses: {', '.join(misses)}" if misses else ""))
    errors.sort(reverse=True)
    print(f"all: {right}/{total} cores right; partly filled: {partial_right}/{partial}")
    print("worst centre errors (share of the diameter): "
          + ", ".join(f"{e:.3f} {where} ({kind})" for e, where, kind in errors[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
