"""Throughput of `equiseg run` on a cohort of cores at the product defaults, against the CNN alone (issue 18).

Cohorts, built from the real tissue in ../shared/data (seeded, in a temporary folder or `--work DIR`):
  gleason  Gleason-size TMA cores: 1.3-mm discs at 0.25 µm/px (5,200 px JPEGs, q90, like Gleason 2019 cores,
           with a manifest.csv giving mpp 0.25). The tissue is real: even cores are 6 x 6 mosaics of EBHI-Seg
           tiles, odd cores 2 x 2 mosaics of osteosarcoma tiles (both about 1 µm/px), a random 1,300 px crop
           enlarged 4x (bilinear); tissue fills the disc, grey 245 outside it.
  ebhi     small EBHI-Seg tiles as they are (224 px; mpp 1.0 in the manifest, the data set's estimate).

Each cohort goes through ONE `python -m equiseg_cli.main run FOLDER -o OUT --device cpu --quiet` in a fresh
process (plus `--extra-args`, nothing else). Printed, as markdown: cores/hour and s/core (wall of the whole run /
N); the per-stage seconds of OUT/manifest.json (`slides[i].seconds`) summed over the run, naming the expected
stages that are missing; what the per-slide seconds do not cover (wall - sum of `total`: start-up, the run-wide
KMeans pass and the run files); and the CNN-only time of the same pixels, measured after the run in a fresh
process per cohort: the default extractor (batch 1, CPU, the run's µm/px), fed each region's tiles as the pipeline
cuts them (`tile_features.plan_tiles`: the region = the core's tissue bounding box found as `equiseg run` finds it),
only `extractor.extract` timed, one warm-up call excluded, one tile at a time (the product's torch threads) and two
at a time (one torch thread each) on two threads and on two forked processes (as the run-wide fit runs them on
Linux); with the ratio end-to-end / the fastest.

Start-up is estimated from one extra run on a single 224-px tile with `--clustering region` (so the features
are computed inside the slide's own `total`): its wall minus the slide's `total`, i.e. interpreter start,
imports, model load, input search and writing the run files: an upper bound on the time to the first tile.

    python benchmarks/bench_cohort.py                       # 50 Gleason-size cores and 200 EBHI tiles
    python benchmarks/bench_cohort.py --quick               # 8 cores and 40 tiles
    python benchmarks/bench_cohort.py --cohort gleason --n 10 --extra-args "--target-mpp 2.5"
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

CORE_MM = 1.3
CORE_MPP = 0.25
SOURCE_MPP = 1.0  # EBHI-Seg and osteosarcoma tiles: about 1 µm/px (estimates, see ../shared/data/SOURCES.md)
ENLARGE = 4  # 1 µm/px -> 0.25 µm/px
EBHI_MPP = 1.0
CORES_PER_SLIDE = 10  # slide001_core001 ... as Gleason 2019 names them
DEFAULT_N = {"gleason": 50, "ebhi": 200}
QUICK_N = {"gleason": 8, "ebhi": 40}
# Per-slide stages `equiseg run` records (slides[i].seconds); "export" holds polygons, pictures and tables.
EXPECTED_STAGES = ("tissue", "read", "cnn", "kmeans", "refine", "export", "total")


@dataclass
class Cohort:
    name: str
    folder: Path
    n: int
    description: str
    mpp: float
    side_px: int
    area_mm2: float  # geometric tissue area of the inputs (discs, or whole tiles)
    result: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- inputs
def _ebhi_tiles(data: Path) -> list[Path]:
    with open(data / "ebhi_seg" / "manifest.csv", newline="") as fh:
        return [data / "ebhi_seg" / row["image"] for row in csv.DictReader(fh)]


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _mosaic(tiles: list[Path], rng: np.random.Generator, per_side: int) -> np.ndarray:
    picks = rng.choice(len(tiles), per_side * per_side, replace=len(tiles) < per_side * per_side)
    imgs = [_rgb(tiles[i]) for i in picks]
    side = min(min(im.shape[:2]) for im in imgs)
    imgs = [im[:side, :side] for im in imgs]
    rows = [np.concatenate(imgs[r * per_side:(r + 1) * per_side], axis=1) for r in range(per_side)]
    return np.concatenate(rows, axis=0)


def _disc_core(mosaic: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A 1.3-mm disc at CORE_MPP from a random crop of `mosaic` (at SOURCE_MPP); returns it and its area (mm²)."""
    src = round(CORE_MM * 1000 / SOURCE_MPP)
    h, w = mosaic.shape[:2]
    if h < src or w < src:
        raise SystemExit(f"mosaic {w}x{h} px is smaller than a {src} px core")
    y, x = int(rng.integers(0, h - src + 1)), int(rng.integers(0, w - src + 1))
    crop = np.ascontiguousarray(mosaic[y:y + src, x:x + src])
    side = round(CORE_MM * 1000 / CORE_MPP)
    big = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BILINEAR))
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
    return np.where(disc[..., None], big, 245).astype(np.uint8), float(disc.sum()) * (CORE_MPP / 1000) ** 2


def _write_manifest(folder: Path, names: list[str], mpp: float, cores: bool) -> None:
    with open(folder / "manifest.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "slide", "core", "mpp"] if cores else ["path", "mpp"])
        for name in names:
            stem = Path(name).stem
            out.writerow([name, *stem.split("_", 1), mpp] if cores else [name, mpp])


def build_gleason(folder: Path, n: int, data: Path, seed: int) -> Cohort:
    rng = np.random.default_rng(seed)
    ebhi = _ebhi_tiles(data)
    osteo = sorted((data / "osteosarcoma").glob("*.jpg"))
    if not osteo:
        raise SystemExit(f"{data / 'osteosarcoma'}: no tiles")
    names, area = [], 0.0
    for i in range(n):
        # 6 x 224 = 1,344 px and 2 x 1,024 = 2,048 px of tissue at ~1 µm/px, each enough for a 1,300 px crop
        mosaic = _mosaic(ebhi, rng, 6) if i % 2 == 0 else _mosaic(osteo, rng, 2)
        core, disc_mm2 = _disc_core(mosaic, rng)
        name = f"slide{i // CORES_PER_SLIDE + 1:03d}_core{i % CORES_PER_SLIDE + 1:03d}.jpg"
        Image.fromarray(core).save(folder / name, quality=90)
        names.append(name)
        area += disc_mm2
    _write_manifest(folder, names, CORE_MPP, cores=True)
    side = round(CORE_MM * 1000 / CORE_MPP)
    desc = (f"{n} Gleason-size cores: {CORE_MM} mm discs ({area / n:.2f} mm² each), {side:,} px JPEG q90 at "
            f"{CORE_MPP} µm/px; EBHI-Seg 6x6 / osteosarcoma 2x2 mosaics (alternating) enlarged {ENLARGE}x")
    return Cohort("gleason", folder, n, desc, CORE_MPP, side, area)


_BUILT = ".built.json"  # beside a cohort's inputs: what was built, so --reuse-inputs can skip the 100-s build


def _keep_cohort(c: Cohort, seed: int) -> None:
    fields_ = {f.name: getattr(c, f.name) for f in fields(c) if f.name not in ("folder", "result")}
    c.folder.with_name(c.folder.name + _BUILT).write_text(json.dumps({**fields_, "seed": seed}), encoding="utf-8")


def _kept_cohort(folder: Path, n: int, seed: int) -> Cohort | None:
    try:
        built = json.loads(folder.with_name(folder.name + _BUILT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if built.pop("seed") != seed or built.get("n") != n:
        return None
    return Cohort(folder=folder, **built)


def build_ebhi(folder: Path, n: int, data: Path, seed: int) -> Cohort:
    tiles = _ebhi_tiles(data)
    picks = np.random.default_rng(seed + 1).choice(len(tiles), n, replace=n > len(tiles))
    names = []
    for j, i in enumerate(picks):
        src = tiles[i]
        name = f"ebhi{j + 1:03d}_{src.parent.name}_{src.stem}{src.suffix}"
        shutil.copyfile(src, folder / name)
        names.append(name)
    _write_manifest(folder, names, EBHI_MPP, cores=False)
    side = _rgb(folder / names[0]).shape[0]
    area = sum(float(np.prod(_rgb(folder / nm).shape[:2])) for nm in names) * (EBHI_MPP / 1000) ** 2
    desc = (f"{n} EBHI-Seg tiles as they are: {side} px at {EBHI_MPP} µm/px (estimate) = {side * EBHI_MPP / 1000:.3f}"
            f" mm across ({area / n:.3f} mm² each)")
    return Cohort("ebhi", folder, n, desc, EBHI_MPP, side, area)


# ------------------------------------------------------------------------------------------------ the runs
def run_equiseg(inputs: Path, out: Path, extra: list[str]) -> tuple[float, dict[str, Any], int, str]:
    """(wall s, manifest, exit status, stderr tail) of one `equiseg run` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: an earlier run's slides would be skipped
    cmd = [sys.executable, "-m", "equiseg_cli.main", "run", str(inputs), "-o", str(out), "--device", "cpu",
           "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"equiseg run wrote no manifest (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr}")
    return wall, json.loads(manifest_path.read_text()), proc.returncode, proc.stderr.strip()[-500:]


def startup_probe(folder: Path, out: Path, tile: Path, extra: list[str], repeats: int = 2) -> tuple[float, float]:
    """(min wall, min wall - slide total) of `repeats` one-tile runs with --clustering region."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tile, folder / "tiny.jpg")
    _write_manifest(folder, ["tiny.jpg"], EBHI_MPP, cores=False)
    walls, overheads = [], []
    for _ in range(repeats):
        wall, manifest, rc, err = run_equiseg(folder, out, [*extra, "--clustering", "region"])
        slide = manifest["slides"][0]
        if slide.get("status") != "done":
            raise SystemExit(f"start-up probe failed (exit {rc}): {slide.get('error') or err}")
        walls.append(wall)
        overheads.append(wall - float(slide["seconds"]["total"]))
    return min(walls), min(overheads)


def _options(cls: type, recorded: dict[str, Any] | None) -> Any:
    """The run's own options (from its manifest) as `cls`, so the CNN-only pass follows --extra-args."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (recorded or {}).items() if k in names})


class CnnOnly:
    """The default extractor in this process, timing `extract` on the tiles the pipeline cuts for a region."""

    def __init__(self) -> None:
        self.extractors: dict[float, Any] = {}
        self.warm = False  # one untimed call first: one-time set-up, not per-tile cost

    def extractor(self, target_mpp: float) -> Any:
        from equiseg_wsi.features import build_extractor
        from equiseg_wsi.options import ExtractorSpec

        if target_mpp not in self.extractors:
            self.extractors[target_mpp] = build_extractor(ExtractorSpec(device="cpu", batch_size=1,
                                                                        target_mpp=target_mpp))
        return self.extractors[target_mpp]

    def measure(self, folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        from equiseg_wsi.errors import NoTissueError
        from equiseg_wsi.inputs import collect_inputs
        from equiseg_wsi.options import RegionOptions, SegmentOptions
        from equiseg_wsi.regions import open_regions
        from equiseg_wsi.tile_features import plan_tiles
        from equiseg_wsi.tiling import read_tile

        recorded = manifest.get("options", {})
        seg = _options(SegmentOptions, recorded.get("segment"))
        regions = _options(RegionOptions, recorded.get("regions"))
        ex = self.extractor(seg.target_mpp)
        halo = ex.recommended_halo if seg.halo is None else seg.halo
        seconds, sides, inputs = 0.0, set(), []
        for source in collect_inputs([folder]):
            with open_regions(source, regions) as (slide, found):
                for area in found.areas:  # cut as the pipeline cuts a region (tile_features.plan_tiles)
                    try:
                        plan = plan_tiles(slide, area, ex, seg)
                    except NoTissueError:
                        continue
                    for t in plan.tiles:
                        inputs.append(read_tile(slide, t, seg.target_mpp)[None])
                        sides.add(plan.tile_size + 2 * plan.halo)
        if not self.warm:
            ex.extract(inputs[0], halo=halo)
            self.warm = True
        for pixels in inputs:  # one tile at a time on the torch threads the product sets (2 here)
            start = time.perf_counter()
            ex.extract(pixels, halo=halo)
            seconds += time.perf_counter() - start
        n_tiles = len(inputs)
        # as the run-wide fit computes them: FIT_THREADS inputs at once, one torch thread each (run_model)
        from equiseg_wsi import forked
        from equiseg_wsi.run_model import FIT_THREADS, _one_torch_thread
        from equiseg_wsi.threads import ordered_map

        threads = min(FIT_THREADS, os.cpu_count() or 1)
        start = time.perf_counter()
        for _ in ordered_map(lambda px: ex.extract(px, halo=halo), inputs, threads, initializer=_one_torch_thread):
            pass
        threaded = time.perf_counter() - start
        # and as the fit runs them on Linux: on FIT_THREADS forked processes (the tiles indexed, not sent)
        forked_s = float("nan")
        if forked.USE_PROCESSES and threads > 1:
            start = time.perf_counter()
            for _ in forked.forked_map(lambda i: ex.extract(inputs[i], halo=halo).shape, range(n_tiles), threads,
                                       initializer=_one_torch_thread):
                pass
            forked_s = time.perf_counter() - start
        best = min(t for t in (seconds, threaded, forked_s) if t == t)
        return {"seconds": best, "serial": seconds, "threaded": threaded, "forked": forked_s, "threads": threads,
                "tiles": n_tiles, "sides": sorted(sides), "halo": halo, "target_mpp": seg.target_mpp}


def cnn_only_in_fresh_process(folder: Path, manifest_path: Path) -> dict[str, Any]:
    """`CnnOnly().measure` in a new interpreter, one per cohort, so one cohort's timing does not start from the
    state the other's left (before `forked.release_mkl_buffers`, the second cohort's forked timing in one process
    hung in MKL's allocator: benchmarks/repro_fork_mkl.py)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cnn-only-of", str(folder), str(manifest_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"CNN-only timing failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------------------- report
def _fmt(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def summarise(cohort: Cohort, wall: float, manifest: dict[str, Any], rc: int, cnn: dict[str, Any]) -> None:
    slides = manifest.get("slides", [])
    stages: dict[str, float] = {}
    for s in slides:
        for k, v in (s.get("seconds") or {}).items():
            stages[k] = stages.get(k, 0.0) + float(v)
    done = sum(s.get("status") == "done" for s in slides)
    cohort.result = {
        "wall": wall, "rc": rc, "done": done, "failed": len(slides) - done, "stages": stages, "cnn": cnn,
        "fit": float(((manifest.get("model") or {}).get("run_kmeans_fit_seconds") or {}).get("wall", 0.0)),
        "tissue_mm2": sum(float(s.get("tissue_area_mm2", 0.0)) for s in slides),
        "errors": sorted({s.get("error", "") for s in slides if s.get("status") != "done"})[:3],
    }


def print_report(cohorts: list[Cohort], startup: tuple[float, float] | None, extra: list[str],
                 load: tuple[float, float]) -> None:
    print()
    print(f"## `equiseg run FOLDER -o OUT --device cpu --quiet{(' ' + shlex.join(extra)) if extra else ''}`, "
          f"one run per cohort")
    print()
    print(f"{os.cpu_count()} CPU core(s), torch threads as the product sets them; load average "
          f"{load[0]:.2f} before, {load[1]:.2f} after (other work on the machine shows here)")
    for c in cohorts:
        print(f"- **{c.name}**: {c.description}; {_fmt(c.area_mm2, 2)} mm² of tissue in all "
              f"(pipeline's own tissue area: {_fmt(c.result['tissue_mm2'], 2)} mm²)")
    print()
    print("| | " + " | ".join(c.name for c in cohorts) + " |")
    print("|---|" + "---:|" * len(cohorts))

    def row(label: str, values: list[str]) -> None:
        print(f"| {label} | " + " | ".join(values) + " |")

    res = [c.result for c in cohorts]
    row("cores (done / failed)", [f"{r['done']} / {r['failed']}" for r in res])
    row("wall of the one run, s", [_fmt(r["wall"]) for r in res])
    row("**s/core** (wall / N)", [_fmt(r["wall"] / c.n, 2) for c, r in zip(cohorts, res, strict=True)])
    row("**cores/hour**", [_fmt(3600 * c.n / r["wall"], 0) for c, r in zip(cohorts, res, strict=True)])
    row("s per mm² of tissue", [_fmt(r["wall"] / c.area_mm2, 2) for c, r in zip(cohorts, res, strict=True)])
    present = [k for k in EXPECTED_STAGES if any(k in r["stages"] for r in res)]
    others = sorted({k for r in res for k in r["stages"]} - set(EXPECTED_STAGES))
    for k in present + others:
        label = {"export": "export (polygons, pictures, tables)", "total": "Σ per-slide total",
                 "segment": "segment (read..refine, per region)"}.get(k, k)
        row(f"Σ {label}, s" if k != "total" else f"{label}, s",
            [_fmt(r["stages"][k]) if k in r["stages"] else "–" for r in res])
    row("run-wide fit pass (tissue, read, glass fill, CNN, KMeans fit), wall s", [_fmt(r["fit"]) for r in res])
    row("slides pass and the rest (wall − fit pass − start-up), s",
        [_fmt(r["wall"] - r["fit"] - (startup[1] if startup else 0.0)) for r in res])
    row("CNN-only, one tile at a time (2 torch threads), s", [_fmt(r["cnn"]["serial"]) for r in res])
    row("CNN-only, 2 tiles at a time on 2 threads (1 torch thread each), s", [_fmt(r["cnn"]["threaded"]) for r in res])
    row("CNN-only, 2 tiles at a time on 2 forked processes (as the run on Linux), s",
        [_fmt(r["cnn"]["forked"]) if r["cnn"]["forked"] == r["cnn"]["forked"] else "–" for r in res])
    row("CNN-only of the same tiles (the fastest way), s", [_fmt(r["cnn"]["seconds"]) for r in res])
    row("tiles fed (side incl. halo, px)",
        [f"{r['cnn']['tiles']} ({', '.join(map(str, r['cnn']['sides']))})" for r in res])
    row("CNN-only s/core", [_fmt(r["cnn"]["seconds"] / c.n, 2) for c, r in zip(cohorts, res, strict=True)])
    row("**end-to-end / CNN-only**",
        [f"{r['wall'] / r['cnn']['seconds']:.2f}x" if r["cnn"]["seconds"] > 0 else "–" for r in res])
    print()
    missing = [k for k in EXPECTED_STAGES if k not in present]
    print(f"Stages in the manifest: {', '.join(present + others)}"
          + (f"; missing: {', '.join(missing)}." if missing else "; none of the expected ones missing.")
          + " Polygons and writing are not separate stages (both inside `export`).")
    cached = [c.name for c, r in zip(cohorts, res, strict=True)
              if r["stages"].get("cnn", 1.0) < 0.05 * r["cnn"]["seconds"]]
    if cached:
        print(f"Per-slide `read`/`cnn` are ~0 for {', '.join(cached)}: with `--clustering run` (the default) the "
              "features are computed in the run-wide KMeans pass before the slides and read back from its cache, "
              "and that pass (tissue, read, CNN, KMeans fit) is recorded nowhere per slide: its wall time is the "
              "fit-pass row. Slides are segmented two at a time, so Σ per-slide total exceeds their wall time.")
    t = res[0]["cnn"]
    print(f"CNN-only: the default extractor, CPU, batch 1, at {t['target_mpp']} µm/px, halo {t['halo']} px; each "
          "region (the core's tissue bounding box, found as `equiseg run` finds it) cut as the pipeline cuts it "
          "(`tile_features.plan_tiles`), pixels read first, then only `extract` timed, one warm-up call excluded, "
          f"three ways: one tile at a time on the product's torch threads, and {t['threads']} tiles at a time on "
          "one torch thread each, on threads and on forked processes (how the run-wide fit runs them on Linux); "
          "the ratio uses the fastest. Pixels as scanned "
          "(no glass fill, which does not change the CNN's cost).")
    if startup is not None:
        print(f"Start-up (upper bound on the time to the first tile): {startup[1]:.1f} s = wall {startup[0]:.1f} s "
              "of a one-tile run (224 px, `--clustering region`) minus its slide `total`; it also holds the input "
              "search and writing manifest/report, so the time to the first tile itself is somewhat less.")
    for c, r in zip(cohorts, res, strict=True):
        if r["rc"] != 0 or r["errors"]:
            print(f"{c.name}: equiseg run exited {r['rc']}; failures: {'; '.join(r['errors']) or 'none recorded'}")


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", choices=("gleason", "ebhi", "both"), default="both", help="which cohort(s) (both)")
    p.add_argument("--n", type=int, default=None, help="cores per cohort (default 50 Gleason-size, 200 EBHI)")
    p.add_argument("--quick", action="store_true", help="8 Gleason-size cores and 40 EBHI tiles")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort's tiles and crops (default 0)")
    p.add_argument("--work", type=Path, default=None, help="build inputs and outputs here and keep them")
    p.add_argument("--data", type=Path, default=DATA, help=f"the shared real data (default {DATA})")
    p.add_argument("--extra-args", default="", help="extra `equiseg run` options, one string")
    p.add_argument("--no-startup", action="store_true", help="skip the one-tile start-up probe")
    p.add_argument("--reuse-inputs", action="store_true",
                   help="with --work: use the inputs an earlier run built there (same cohort, n and seed)")
    p.add_argument("--cnn-only-of", nargs=2, type=Path, metavar=("FOLDER", "MANIFEST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cnn_only_of:  # the CNN-only timing of one cohort, in its own process (see cnn_only_in_fresh_process)
        folder, manifest_path = args.cnn_only_of
        print(json.dumps(CnnOnly().measure(folder, json.loads(manifest_path.read_text(encoding="utf-8")))))
        return
    data = args.data
    needed = [data / "ebhi_seg" / "manifest.csv", data / "osteosarcoma"]
    if not all(path.exists() for path in needed):
        print(f"bench_cohort: the shared real tissue is not here ({', '.join(str(x) for x in needed)}); "
              "nothing measured.")
        sys.exit(0)
    if args.n is not None and args.n < 1:
        p.error("--n must be at least 1")
    extra = shlex.split(args.extra_args)
    names = ["gleason", "ebhi"] if args.cohort == "both" else [args.cohort]
    work = args.work or Path(tempfile.mkdtemp(prefix="equiseg-bench-cohort-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    try:
        cohorts = []
        for name in names:
            n = args.n or (QUICK_N if args.quick else DEFAULT_N)[name]
            folder = work / f"{name}_inputs"
            kept = _kept_cohort(folder, n, args.seed) if args.reuse_inputs else None
            if kept is not None:
                cohorts.append(kept)
                print(f"reused {name}: {n} inputs ({folder})", flush=True)
                continue
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            start = time.perf_counter()
            build = build_gleason if name == "gleason" else build_ebhi
            cohorts.append(build(folder, n, data, args.seed))
            _keep_cohort(cohorts[-1], args.seed)
            print(f"built {name}: {n} inputs in {time.perf_counter() - start:.1f} s ({folder})", flush=True)
        startup = None
        if not args.no_startup:
            startup = startup_probe(work / "startup_input", work / "startup_out", _ebhi_tiles(data)[0], extra)
            print(f"start-up probe: {startup[1]:.1f} s", flush=True)
        for c in cohorts:
            wall, manifest, rc, _ = run_equiseg(c.folder, work / f"{c.name}_out", extra)
            print(f"ran {c.name}: {wall:.1f} s", flush=True)
            summarise(c, wall, manifest, rc,
                      cnn_only_in_fresh_process(c.folder, work / f"{c.name}_out" / "manifest.json"))
            print(f"CNN-only {c.name}: {c.result['cnn']['seconds']:.1f} s", flush=True)
        print_report(cohorts, startup, extra, (load_before, os.getloadavg()[0]))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
