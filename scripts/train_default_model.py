"""Train the packaged default model: dense gland-mask supervision on the EBHI-Seg development cases.

The development / validation split is `benchmarks/bench_segmentation.py`'s (by case, seed 15); validation
cases are never read here. The development cases are split again, by case: 80 % train, 20 % select (the
checkpoint with the lowest selection cross entropy is kept). Resumable: run the same command again after a stop.

    python scripts/train_default_model.py --out /tmp/equiseg-train [--steps 2000] [--stop-after-min 100]
    cp /tmp/equiseg-train/weights.pt equiseg_wsi/data/default_sre.pt   # after checking it with the benchmark
    python scripts/train_default_model.py --kind standard --out /tmp/equiseg-twin   # the standard-conv twin
    cp /tmp/equiseg-twin/weights.pt equiseg_wsi/data/default_standard.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_segmentation as bs  # noqa: E402

from equiseg_wsi.training.masks import MaskTrainConfig, load_pairs, train_on_masks  # noqa: E402

SELECT_FRACTION = 0.2
SELECT_SEED = 16


def split_dev_cases(data: Path) -> tuple[list[bs.Tile], list[bs.Tile]]:
    """Development tiles of EBHI-Seg as (train, select), split by case with a seeded shuffle."""
    tiles = bs.load_tiles(data / "ebhi_seg")
    split = bs.case_split(tiles)
    dev_cases = sorted({t.case for t in tiles if split[t.case] == "dev"})
    order = np.random.default_rng(SELECT_SEED).permutation(dev_cases)
    select_cases = set(order[: round(SELECT_FRACTION * len(order))].tolist())
    dev = sorted((t for t in tiles if split[t.case] == "dev"), key=lambda t: t.name)
    return [t for t in dev if t.case not in select_cases], [t for t in dev if t.case in select_cases]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=bs.DEFAULT_DATA, help="folder holding ebhi_seg/")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoint, weights, case lists)")
    p.add_argument("--steps", type=int, default=MaskTrainConfig.steps)
    p.add_argument("--kind", choices=("sre", "standard"), default="sre", help="sre, or the standard-conv twin")
    p.add_argument("--stop-after-min", type=float, default=None, help="stop at the next checkpoint after this")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (args.data / "ebhi_seg" / "manifest.csv").is_file():
        raise SystemExit(f"{args.data / 'ebhi_seg'}: EBHI-Seg not found (see ../shared/data/SOURCES.md)")
    torch.set_num_threads(args.threads)
    train_tiles, select_tiles = split_dev_cases(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, ts in (("train", train_tiles), ("select", select_tiles)):
        (args.out / f"{name}_cases.txt").write_text("".join(f"{c}\n" for c in sorted({t.case for t in ts})))
    cfg = MaskTrainConfig(kind=args.kind, steps=args.steps)
    print(f"train {len(train_tiles)} tiles / select {len(select_tiles)} tiles; {cfg}", flush=True)
    start = time.perf_counter()
    train = load_pairs([(t.image, t.mask, t.case) for t in train_tiles])
    select = load_pairs([(t.image, t.mask, t.case) for t in select_tiles])
    print(f"loaded in {time.perf_counter() - start:.0f} s", flush=True)
    provenance = {"data": "EBHI-Seg (Shi et al. 2023, CC BY 4.0), development cases of benchmarks/bench_segmentation",
                  "command": "python scripts/train_default_model.py " + " ".join(sys.argv[1:])}
    result = train_on_masks(cfg, train, select, args.out, provenance=provenance,
                            stop_after_s=None if args.stop_after_min is None else 60 * args.stop_after_min,
                            on_eval=lambda row: print(json.dumps(row), flush=True))
    print(f"best step {result.best_step}; {result.seconds:.0f} s this call; weights {result.weights}", flush=True)


if __name__ == "__main__":
    main()
