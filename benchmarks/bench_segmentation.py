"""Segment quality against pathologist masks: `equiseg run` and colour baselines on EBHI-Seg colon tiles.

Data: ``../shared/data/ebhi_seg`` (224 x 224 H&E tiles of colon biopsies with binary gland masks, white = gland /
tumour epithelium, black = stroma and lumen; EBHI-Seg, Shi et al. 2023, CC BY 4.0). Its resolution is not stated;
about 1 µm/px is an estimate from nuclear size (``--mpp``; worth checking at 0.8 and 1.25). Without the data folder
the benchmark says so and exits 0.

Split: the data set ships none, so cases (not tiles) are split once, with the fixed seed ``SPLIT_SEED`` (never
``--seed``): within each diagnostic class (a case's most frequent class), the sorted case ids are shuffled and the
first 30 % (rounded) go to validation, the rest to development. Tiles whose mask holds one class only
(``gland_fraction`` 1.0 in the manifest) are left out: NMI and edges are undefined there. ``--n-images`` takes tiles
round-robin over the split's cases in a seeded order (one tile of each case first), so a subset spans many cases.

Methods, all scored identically on the same tiles:

* ``equiseg run`` through its CLI, as a user calls it (``python -m equiseg_cli.main run TILES -o OUT --mpp M``
  plus ``--n-clusters K --seed S``, ``--extra-args``, then the row's own options): the product defaults, the same
  with the other ``--refine`` setting (the refined and the unrefined cell grid), with ``--target-mpp 2.5``, with
  ``--weights random``, with the previous release's defaults when ``--previous-weights`` gives its model file
  (``--target-mpp 2.5 --glass keep --refine none --layer layer4``), and with the standard-convolution twin when
  its trained weights are installed (``equiseg_wsi/data/default_standard.pt``);
* KMeans (K, seeded, n_init 10) per tile on per-cell mean RGB, on mean H&E optical density (H and E channels
  of ``skimage.color.rgb2hed``), and on mean and standard deviation of both, z-scored over the tile's cells, on
  square cells of 4, 8 and 20 µm from the tile's origin; a cell with less than half its area in the tile is left
  unlabelled (as the pipeline leaves such edge cells out), every other cell's label covers its pixels exactly.

Scoring, at the mask's own pixels: the exported ``<slide>.geojson`` segments (``Cluster i`` annotations, level-0
px; for a plain tile that is the tile's pixel grid) are rasterised with rasterio (a pixel takes the segment that
holds its centre). Pixels a method leaves unlabelled (outside every segment: glass, partial edge cells) are
excluded from its scores; coverage is in the CSV. Per tile: NMI and ARI (scikit-learn), matched accuracy
(many-to-one: each cluster takes the mask class holding most of its pixels), gland Dice of that assignment, and
the boundary F-measure of that gland/stroma assignment against the mask edges (tolerance 2 µm). Aggregates: mean
over tiles with a 95 % interval from 2000 case-level bootstrap resamples (seeded; cases drawn with replacement,
each with all its tiles; the same resamples for every method, so the NMI ratio gets a paired interval).

Rim share: the largest share of one cluster's feature cells that lie within one cell (8-neighbourhood) of
background or the map border, read from each ``<region>_labels.png``; next to it, the share of all tissue cells
there (what a cluster spread at random would score). Sets: the CC0 skin region, osteosarcoma tiles
(``../shared/data/osteosarcoma``, about 1 µm/px) and the EBHI tiles just segmented.

Run: ``python benchmarks/bench_segmentation.py [--quick] [--split dev|val] [--n-images N] [--k K] [--seed 42]
[--mpp 1.0] [--extra-args "--halo 64"] [--rows defaults,...] [--rim-rows defaults,...] [--previous-weights OLD.pt]
[--out DIR] [--keep-runs] [--no-rim]``. ``--quick``: 12 validation tiles, the rim sets at the defaults (and the
previous defaults) only, 3 osteosarcoma tiles. The full validation split (470 tiles, five rows, no rim sets) took
about 35 minutes on 2 CPU cores shared part of the time with a training run; the rim sets (CC0 region and all 60
osteosarcoma tiles, two rows) about 10 minutes.

Rim share is measured on the feature-cell scale also for refined maps: "within one cell" is as many map pixels
as a feature cell holds (read from the label PNG's ``equiseg:cell_um``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seg_metrics as sm  # noqa: E402

from equiseg_wsi.models.weights import default_weights, has_default_weights  # noqa: E402
from equiseg_wsi.options import RunOptions, SegmentOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
SKIN = REPO / "sample_data" / "CMU-1-Small-Region.svs"
SPLIT_SEED = 15  # fixes the dev/val split of EBHI-Seg cases for good
VAL_FRACTION = 0.3
BOUNDARY_TOL_UM = 2.0
FEATURE_STRIDE = 8  # target px per feature cell with layer4 (every row here uses layer4)
N_RESAMPLES = 2000
METRICS = ("nmi", "ari", "acc", "dice", "bf")
# The options of the release before issue 15 that differ from today's (with its weights file, --previous-weights).
PREVIOUS_DEFAULTS = ("--target-mpp", "2.5", "--glass", "keep", "--refine", "none", "--layer", "layer4")
METRIC_TITLES = ("NMI", "ARI", "matched acc", "gland Dice", "boundary F")
CSV_METRICS = ("nmi", "ari", "acc", "acc_1to1", "dice", "bf", "bf_clusters", "coverage")


@dataclass(frozen=True)
class Tile:
    name: str  # unique file stem: <class folder>__<original stem>
    image: Path
    mask: Path
    case: str
    diagnosis: str
    gland_fraction: float


@dataclass(frozen=True)
class Variant:
    label: str
    slug: str
    args: tuple[str, ...]


@dataclass
class Run:
    """One `equiseg run` call: its wall time, the µm/px the model saw, and the manifest entry of each slide."""
    wall_s: float
    slides: dict[str, dict[str, Any]]
    target_mpp: float


# --- data and split -------------------------------------------------------------------------------------------

def load_tiles(root: Path) -> list[Tile]:
    """Every EBHI-Seg tile of its manifest."""
    tiles = []
    with (root / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            image = root / row["image"]
            tiles.append(Tile(f"{image.parent.name}__{image.stem}", image, root / row["mask"], row["case"],
                              row["class"], float(row["gland_fraction"])))
    return tiles


def two_classes(t: Tile) -> bool:
    """Whether the mask holds both gland and stroma (NMI and mask edges are undefined otherwise)."""
    return 0.0 < t.gland_fraction < 1.0


def case_split(tiles: Sequence[Tile]) -> dict[str, str]:
    """Case id -> "dev" or "val": per diagnosis, a seeded shuffle of the sorted case ids; 30 % to validation."""
    by_case: dict[str, Counter[str]] = defaultdict(Counter)
    for t in tiles:
        by_case[t.case][t.diagnosis] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for case in sorted(by_case):
        counts = by_case[case]
        by_class[min(counts, key=lambda d: (-counts[d], d))].append(case)
    rng = np.random.default_rng(SPLIT_SEED)
    split = {}
    for diagnosis in sorted(by_class):
        cases = list(rng.permutation(by_class[diagnosis]))
        n_val = round(VAL_FRACTION * len(cases))
        split.update({str(c): "val" if i < n_val else "dev" for i, c in enumerate(cases)})
    return split


def select_tiles(tiles: Sequence[Tile], split: dict[str, str], side: str, n: int | None) -> list[Tile]:
    """Two-class tiles of one side of the split, round-robin over its cases in a seeded order (n None: all)."""
    rng = np.random.default_rng(SPLIT_SEED + 1)
    by_case: dict[str, list[Tile]] = defaultdict(list)
    for t in sorted(tiles, key=lambda t: t.name):
        if split[t.case] == side and two_classes(t):
            by_case[t.case].append(t)
    queues = [[by_case[c][i] for i in rng.permutation(len(by_case[c]))] for c in rng.permutation(sorted(by_case))]
    chosen = []
    for depth in range(max(len(q) for q in queues)):
        chosen += [q[depth] for q in queues if depth < len(q)]
    return chosen if n is None else chosen[:n]


def split_summary(tiles: Sequence[Tile], split: dict[str, str]) -> str:
    """One line: cases and usable tiles on each side of the split, and the tiles left out."""
    parts = []
    for side in ("dev", "val"):
        usable = [t for t in tiles if split[t.case] == side and two_classes(t)]
        parts.append(f"{side} {sum(s == side for s in split.values())} cases / {len(usable)} tiles")
    left_out = sum(not two_classes(t) for t in tiles)
    return (f"# EBHI-Seg split by case (seed {SPLIT_SEED}, {VAL_FRACTION:.0%} of each diagnosis' cases to val): "
            f"{', '.join(parts)}; {left_out} tiles with a one-class mask left out")


# --- the pipeline ---------------------------------------------------------------------------------------------

def pipeline_variants(previous_weights: Path | None = None) -> list[Variant]:
    """The pipeline rows: defaults, the other refinement, the coarser 2.5 µm/px, random weights, the previous
    release's defaults when its weights file is given, and the twin when installed."""
    seg = SegmentOptions()
    other_refine = "none" if seg.refine != "none" else "colour"
    clustering = RunOptions().clustering
    variants = [Variant(f"equiseg run (defaults: --clustering {clustering})", "defaults", ()),
                Variant("equiseg run --clustering region", "clustering-region", ("--clustering", "region")),
                Variant(f"equiseg run --refine {other_refine}", f"refine-{other_refine}", ("--refine", other_refine)),
                Variant("equiseg run --target-mpp 2.5", "target-mpp-2.5", ("--target-mpp", "2.5")),
                Variant("equiseg run --weights random", "weights-random", ("--weights", "random"))]
    if previous_weights is not None:
        variants.append(Variant("previous defaults (skin SSL model, 2.5 µm/px, glass kept)", "previous",
                                ("--weights", str(previous_weights), *PREVIOUS_DEFAULTS)))
    if has_default_weights("standard"):
        twin = default_weights("standard")
        variants.append(Variant("equiseg run, standard twin", "twin", ("--weights", str(twin))))
    else:
        print("standard-conv twin skipped: no trained twin weights installed (equiseg_wsi/data/"
              "default_standard.pt; docs/model_card.md says it is not shipped)", file=sys.stderr)
    return variants


def run_pipeline(inputs: Sequence[Path], out: Path, mpp: float | None, args: Sequence[str]) -> Run:
    """Call `equiseg run` as a user would, in a child process; read back its manifest."""
    cmd = [sys.executable, "-m", "equiseg_cli.main", "run", *map(str, inputs), "-o", str(out), "--quiet",
           "--overwrite", *(["--mpp", str(mpp)] if mpp is not None else []), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    manifest_path = out / "manifest.json"
    if proc.returncode not in (0, 1) or not manifest_path.exists():
        raise SystemExit(f"equiseg run failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr}")
    manifest = json.loads(manifest_path.read_text())
    slides = {s["name"]: s for s in manifest["slides"]}
    for name, s in slides.items():
        if s["status"] != "done":
            print(f"  {name}: {s['status']} ({s.get('error')})", file=sys.stderr)
    return Run(wall, slides, float(manifest["options"]["segment"]["target_mpp"]))


def score_pipeline(tiles: Sequence[Tile], run: Run, out: Path, label: str, tol_px: float) -> list[dict[str, Any]]:
    """Per-tile rows of one pipeline run (NaN scores for a tile the run failed)."""
    rows = []
    for t in tiles:
        mask = np.asarray(Image.open(t.mask)).astype(bool)
        slide = run.slides.get(t.name, {})
        geojson = out / t.name / f"{t.name}.geojson"
        if slide.get("status") == "done" and geojson.exists():
            scores = sm.score_image(sm.rasterise_segments(geojson, *mask.shape), mask, tol_px)
            cell = slide["regions"][0]["cell_size_um"]
        else:
            scores, cell = dict.fromkeys(CSV_METRICS, float("nan")), float("nan")
        rows.append(_row(t, label, cell, scores))
    return rows


def _row(t: Tile, method: str, cell_um: float, scores: dict[str, float]) -> dict[str, Any]:
    return {"method": method, "cell_um": cell_um, "image": t.name, "case": t.case, "diagnosis": t.diagnosis,
            "gland_fraction": t.gland_fraction, **{m: scores[m] for m in CSV_METRICS}}


# --- baselines ------------------------------------------------------------------------------------------------

def score_baselines(tiles: Sequence[Tile], cells_um: Sequence[float], k: int, seed: int, mpp: float,
                    tol_px: float) -> tuple[list[dict[str, Any]], str]:
    """Per-tile rows of every colour baseline; also the name of the rgb2hed used."""
    rgb2hed, hed_name = sm.rgb2hed_function()
    rows = []
    with threadpool_limits(1):  # KMeans on a few thousand cells: threads only contend on a shared 2-core CPU
        for t in tiles:
            rgb = np.asarray(Image.open(t.image).convert("RGB"))
            mask = np.asarray(Image.open(t.mask)).astype(bool)
            for cell_um in cells_um:
                cell_px = max(1, round(cell_um / mpp))
                for fs in sm.FEATURE_SETS:
                    labels = sm.colour_baseline(rgb, cell_px, fs, k, seed, rgb2hed)
                    rows.append(_row(t, sm.FEATURE_LABELS[fs], cell_px * mpp, sm.score_image(labels, mask, tol_px)))
    return rows, hed_name


# --- rim share ------------------------------------------------------------------------------------------------

def label_maps(run: Run, out: Path) -> list[tuple[np.ndarray, int]]:
    """The `<region>_labels.png` maps (0 = background) of a run's finished slides, each with its map pixels per
    feature cell (1 on the cell grid; more when `--refine` drew the map on a finer grid)."""
    maps = []
    feature_cell_um = run.target_mpp * FEATURE_STRIDE
    for s in run.slides.values():
        if s["status"] == "done":
            for p in s["outputs"]:
                if p.endswith("_labels.png"):
                    png = Image.open(out / p)
                    width = max(1, round(feature_cell_um / float(png.text["equiseg:cell_um"])))
                    maps.append((np.asarray(png), width))
    return maps


def rim_row(set_name: str, variant: str, maps: Sequence[tuple[np.ndarray, int]]) -> dict[str, Any]:
    shares = np.array([sm.rim_share(m, width) for m, width in maps]).reshape(-1, 2)
    return {"set": set_name, "method": variant, "maps": len(maps), "rim_share_mean": float(np.nanmean(shares[:, 0])),
            "rim_share_max": float(np.nanmax(shares[:, 0])), "rim_cells_mean": float(np.nanmean(shares[:, 1]))}


def rim_sets(data: Path, quick: bool) -> list[tuple[str, list[Path], float | None]]:
    """(name, inputs, --mpp) of the rim-share image sets that exist here."""
    sets: list[tuple[str, list[Path], float | None]] = []
    skin = SKIN if SKIN.exists() else data / SKIN.name
    if skin.exists():
        sets.append(("CC0 skin", [skin], None))
    osteo = sorted((data / "osteosarcoma").glob("*.jpg"))
    if quick:
        by_class: dict[str, list[Path]] = defaultdict(list)
        for p in osteo:
            by_class[p.name.split("___")[0]].append(p)
        osteo = [p for ps in by_class.values() for p in ps[:1]]
    if osteo:
        sets.append(("osteosarcoma", osteo, 1.0))
    return sets


# --- report ---------------------------------------------------------------------------------------------------

def summarise(rows: Sequence[dict[str, Any]], tiles: Sequence[Tile],
              seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """One summary per (method, cell): mean and case-bootstrap interval of each metric; and the NMI-ratio lines."""
    order = {t.name: i for i, t in enumerate(tiles)}
    resamples = sm.case_resamples([t.case for t in tiles], N_RESAMPLES, seed)
    groups: dict[tuple[str, float], dict[str, np.ndarray]] = {}
    for key in dict.fromkeys((r["method"], r["cell_um"]) for r in rows):
        vals = {m: np.full(len(tiles), np.nan) for m in (*METRICS, "coverage")}
        for r in rows:
            if (r["method"], r["cell_um"]) == key:
                for m in vals:
                    vals[m][order[r["image"]]] = r[m]
        groups[key] = vals
    summary: list[dict[str, Any]] = [
        {"method": key[0], "cell_um": key[1], "coverage": float(np.nanmean(v["coverage"])),
         **{m: sm.mean_interval(v[m], resamples) for m in METRICS}}
        for key, v in groups.items()]
    colour = [s for s in summary if s["method"] in sm.FEATURE_LABELS.values()]
    if not colour:
        return summary, []
    best = max(colour, key=lambda s: s["nmi"][0])
    best["best"] = True
    lines = []
    for key in (k for k in groups if k[0].startswith("equiseg run")):
        ratio = sm.ratio_interval(groups[key]["nmi"], groups[(best["method"], best["cell_um"])]["nmi"], resamples)
        lines.append(f"NMI ratio {key[0]} / best colour baseline ({best['method']}, {best['cell_um']:g} µm): "
                     f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}] (paired case bootstrap)")
    return summary, lines


def print_table(summary: Sequence[dict[str, Any]]) -> None:
    print("| method | cell µm | " + " | ".join(METRIC_TITLES) + " | px scored |")
    print("|---|---|" + "---|" * (len(METRICS) + 1))
    for s in summary:
        name = s["method"] + (" (best colour baseline)" if s.get("best") else "")
        cells = [f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for v in (s[m] for m in METRICS)]
        print(f"| {name} | {s['cell_um']:g} | " + " | ".join(cells) + f" | {s['coverage']:.3f} |")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_timings(timings: Sequence[dict[str, Any]]) -> None:
    print("| image set | method | images | wall s | wall s/image | in-process s/image |")
    print("|---|---|---|---|---|---|")
    for t in timings:
        print(f"| {t['set']} | {t['method']} | {t['images']} | {t['wall_s']:.1f} | {t['wall_s'] / t['images']:.2f} "
              f"| {t['inner_s'] / t['images']:.2f} |")


def print_rims(rims: Sequence[dict[str, Any]]) -> None:
    print("| image set | method | label maps | rim share (mean) | rim share (max) | tissue cells at the rim |")
    print("|---|---|---|---|---|---|")
    for r in rims:
        print(f"| {r['set']} | {r['method']} | {r['maps']} | {r['rim_share_mean']:.3f} | {r['rim_share_max']:.3f} "
              f"| {r['rim_cells_mean']:.3f} |")


# --- main -----------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 validation tiles; rim sets at the defaults only")
    p.add_argument("--split", choices=("dev", "val"), default="val", help="cases to report on (default val)")
    p.add_argument("--n-images", type=int, default=None, help="tiles to use (default: all of the split; quick 12)")
    p.add_argument("--k", type=int, default=SegmentOptions().n_clusters,
                   help="clusters, for the pipeline and every baseline (default: the product's, %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="pipeline, KMeans and bootstrap seed (default 42)")
    p.add_argument("--mpp", type=float, default=1.0, help="EBHI-Seg µm/px (an estimate; default 1.0)")
    p.add_argument("--cell-sizes", default="4,8,20", help="baseline cell sides in µm (default 4,8,20)")
    p.add_argument("--extra-args", default="", help="options added to every `equiseg run` (one quoted string)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default ../shared/data)")
    p.add_argument("--out", type=Path, default=None, help="folder for the CSVs (default: a new temporary one)")
    p.add_argument("--keep-runs", action="store_true", help="keep inputs and pipeline outputs under OUT/runs")
    p.add_argument("--no-rim", action="store_true", help="skip the rim-share image sets")
    p.add_argument("--rows", default=None, help="pipeline rows to run (slugs, comma-separated; default all)")
    p.add_argument("--rim-rows", default=None,
                   help="rows (slugs: defaults, previous, refine-none, ...) run on the rim sets; default all, "
                   "with --quick defaults,previous")
    p.add_argument("--previous-weights", type=Path, default=None,
                   help="weights file of the previous default model: adds a row with the previous defaults")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick and args.rim_rows is None:
        args.rim_rows = "defaults,previous"
    ebhi = args.data / "ebhi_seg"
    if not (ebhi / "manifest.csv").exists():
        print(f"bench_segmentation: no EBHI-Seg data at {ebhi} (the shared data folder is absent); nothing to do.")
        return
    n_images = args.n_images if args.n_images is not None else (12 if args.quick else None)
    tiles_all = load_tiles(ebhi)
    split = case_split(tiles_all)
    tiles = select_tiles(tiles_all, split, args.split, n_images)
    print(split_summary(tiles_all, split))
    out = args.out or Path(tempfile.mkdtemp(prefix="equiseg-bench-seg-"))
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    if args.keep_runs and runs_dir.exists():
        raise SystemExit(f"{runs_dir} exists; remove it or choose another --out")
    work = runs_dir if args.keep_runs else Path(tempfile.mkdtemp(prefix="equiseg-bench-seg-runs-"))
    try:
        report(args, tiles, split, out, work)
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, tiles: list[Tile], split: dict[str, str], out: Path, work: Path) -> None:
    """Run every method, print the tables and write the CSVs."""
    print(f"# reporting {len(tiles)} {args.split} tiles of {len({t.case for t in tiles})} cases, K = {args.k}, "
          f"{args.mpp} µm/px, boundary tolerance {BOUNDARY_TOL_UM} µm, seed {args.seed}")
    tol_px = BOUNDARY_TOL_UM / args.mpp
    common = ["--n-clusters", str(args.k), "--seed", str(args.seed), *shlex.split(args.extra_args)]
    inputs = work / "inputs" / "ebhi"
    inputs.mkdir(parents=True)
    for t in tiles:
        shutil.copyfile(t.image, inputs / f"{t.name}{t.image.suffix}")
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    rims: list[dict[str, Any]] = []
    variants = [v for v in pipeline_variants(args.previous_weights)
                if args.rows is None or v.slug in args.rows.split(",")]
    for v in variants:
        run_out = work / "ebhi" / v.slug
        run = run_pipeline([inputs], run_out, args.mpp, [*common, *v.args])
        timings.append(_timing("EBHI-Seg", v.label, len(tiles), run))
        print(f"  {v.label}: {run.wall_s:.1f} s for {len(tiles)} tiles", file=sys.stderr, flush=True)
        rows += score_pipeline(tiles, run, run_out, v.label, tol_px)
        rims.append(rim_row("EBHI-Seg", v.label, label_maps(run, run_out)))
    cells_um = [float(c) for c in args.cell_sizes.split(",")]
    start = time.perf_counter()
    baseline_rows, hed_name = score_baselines(tiles, cells_um, args.k, args.seed, args.mpp, tol_px)
    print(f"  colour baselines: {time.perf_counter() - start:.1f} s ({hed_name})", file=sys.stderr, flush=True)
    rows += baseline_rows
    if not args.no_rim:
        for name, paths, mpp in rim_sets(args.data, args.quick):
            for v in [u for u in variants if args.rim_rows is None or u.slug in args.rim_rows.split(",")]:
                run_out = work / "rim" / name.replace(" ", "_") / v.slug
                run = run_pipeline(paths, run_out, mpp, [*common, *v.args])
                timings.append(_timing(name, v.label, len(paths), run))
                rims.append(rim_row(name, v.label, label_maps(run, run_out)))
    summary, ratio_lines = summarise(rows, tiles, args.seed)
    print(f"\nOptions for every `equiseg run`: {shlex.join(common)}\n")
    print_table(summary)
    print("\n" + "\n".join(ratio_lines) + "\n")
    print_rims(rims)
    print()
    print_timings(timings)
    write_csv(out / "per_image.csv", rows)
    write_csv(out / "rim_share.csv", rims)
    print(f"\nper-image scores: {out / 'per_image.csv'}; rim shares: {out / 'rim_share.csv'}")


def _timing(set_name: str, method: str, n: int, run: Run) -> dict[str, Any]:
    inner = sum(float(s.get("seconds", {}).get("total", 0.0)) for s in run.slides.values())
    return {"set": set_name, "method": method, "images": n, "wall_s": run.wall_s, "inner_s": inner}


if __name__ == "__main__":
    main()
