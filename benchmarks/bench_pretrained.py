"""Does training help? The trained default model against its seeded random initialisation, on held-out H&E only.

Held-out images (never read during training; the default model was trained on the level-0 rectangle
0,0,2220,1780 of the CC0 region, and every training view lay wholly inside it):

* ``cmu-bottom``: CMU-1-Small-Region.svs rows 1800-2967 (level-0 px), 2220 x 1167 px at 0.499 µm/px, CC0;
  segmented at 2.5 µm/px (the product's target) and at 1.25 µm/px;
* ``crc``: tests/data/CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif, a 224 px colon tile at 0.5 µm/px (CC BY 4.0,
  Kather et al.), another organ and lab, segmented at 1.0 µm/px.

Three measures, per image and model (K = 3, same KMeans options for all):

1. rotation robustness: the protocol of ``equiseg_wsi.robustness`` (padded square, rotate, frozen 0° KMeans,
   labels rotated back, scored on shared tissue) at off-grid angles; mean pixel agreement, Dice and ARI;
2. spatial coherence of the 0° segmentation: boundary length between different clusters per tissue area
   (mm per mm²) and connected fragments per mm² (lower = more coherent segments), on the raw KMeans labels
   and after the product's default clean-up (segments < 2000 µm² merged into their neighbours, as
   ``equiseg run`` does);
3. agreement with stain structure: normalised mutual information between the clusters and a
   haematoxylin / eosin / background labelling of the same cells from Ruifrok-Johnston colour
   deconvolution (per pixel: background where the optical density is low, else the stain whose amount,
   relative to its mean over the image's tissue, is larger; per cell the majority).

Also printed, descriptive only: ``rim_share``, the largest share of one cluster's cells that touch glass (near 1
when a cluster is a rim around the tissue, an artifact of features that see the glass beside an edge).

Run: ``python benchmarks/bench_pretrained.py [--trained PATH] [--twin PATH] [--random-seed N]`` (default: the
packaged model against the product's random initialisation, seed 0).
Prints one table; takes a few minutes on a 2-core CPU.

Model selection must not look at the held-out images: ``--validation`` measures instead on the CC0 region's
rows 1400-1780 (``cmu-val``, at 2.5 and 1.25 µm/px), for candidates trained with ``--region 0,0,2220,1400``
(which leaves those rows unseen). Only the chosen model is then measured on the held-out images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from sklearn.metrics import normalized_mutual_info_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from equiseg_wsi.models.resnet import ArchSpec  # noqa: E402
from equiseg_wsi.options import ExtractorSpec, SegmentOptions  # noqa: E402
from equiseg_wsi.polygons import remove_small_segments  # noqa: E402
from equiseg_wsi.pretrain import rgb_to_hed  # noqa: E402
from equiseg_wsi.regions import RegionArea  # noqa: E402
from equiseg_wsi.robustness import (  # noqa: E402
    ModelUnderTest,
    RotationSeries,
    is_quarter_turn,
    rotation_series,
    square_core,
)
from equiseg_wsi.slide import Slide, open_slide  # noqa: E402
from equiseg_wsi.tissue import detect_tissue  # noqa: E402

HELD_OUT_Y0 = 1800  # level-0 row where the held-out part of the CC0 region starts (training ended at 1780)
VALIDATION_ROWS = (1400, 1780)  # level-0 rows for model selection (candidates are trained on rows 0-1400)
ANGLES = (0.0, 20.0, 45.0, 70.0, 90.0, 135.0, 200.0, 290.0)
MIN_SEGMENT_UM2 = SegmentOptions().min_segment_um2  # the product's default clean-up
BACKGROUND_OD = 0.3  # summed RGB optical density below which a pixel counts as background (bright)


def _cmu_rows(y0: int, y1: int | None) -> tuple[np.ndarray, float]:
    """Level-0 rows y0..y1 (None: to the bottom) of the CC0 region, and its µm/px."""
    with open_slide(ROOT / "sample_data" / "CMU-1-Small-Region.svs") as s:
        y1 = s.height if y1 is None else y1
        return s.read_region(0, y0, s.width, y1 - y0, s.mpp), s.mpp


def validation_images() -> list[tuple[str, Slide, float]]:
    """(name, one-level slide, target µm/px) for model selection: rows 1400-1780, never held out."""
    rows, mpp = _cmu_rows(*VALIDATION_ROWS)
    return [(f"cmu-val@{t:g}", Slide.from_array(rows, mpp=mpp, name="cmu-val"), t) for t in (2.5, 1.25)]


def held_out_images() -> list[tuple[str, Slide, float]]:
    """(name, one-level slide, target µm/px) for every held-out evaluation."""
    bottom, mpp = _cmu_rows(HELD_OUT_Y0, None)
    crc = tifffile.imread(ROOT / "tests" / "data" / "CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif")[..., :3]
    return [
        ("cmu-bottom@2.5", Slide.from_array(bottom, mpp=mpp, name="cmu-bottom"), 2.5),
        ("cmu-bottom@1.25", Slide.from_array(bottom, mpp=mpp, name="cmu-bottom"), 1.25),
        ("crc@1.0", Slide.from_array(np.ascontiguousarray(crc), mpp=0.5, name="crc"), 1.0),
    ]


def stain_labels(rgb: np.ndarray, cell: int) -> np.ndarray:
    """Per feature cell: 1 background, 2 haematoxylin-dominant, 3 eosin-dominant (majority of pixels)."""
    hed = rgb_to_hed(rgb)
    od = -np.log10(np.clip(rgb.astype(np.float64), 1, 255) / 255).sum(axis=-1)
    tissue = od >= BACKGROUND_OD
    h, e = hed[..., 0], hed[..., 1]
    hn = h / max(h[tissue].mean(), 1e-6) if tissue.any() else h
    en = e / max(e[tissue].mean(), 1e-6) if tissue.any() else e
    px = np.where(~tissue, 1, np.where(hn > en, 2, 3))
    n_h, n_w = rgb.shape[0] // cell, rgb.shape[1] // cell
    blocks = px[: n_h * cell, : n_w * cell].reshape(n_h, cell, n_w, cell).transpose(0, 2, 1, 3).reshape(n_h, n_w, -1)
    counts = np.stack([(blocks == k).sum(-1) for k in (1, 2, 3)], axis=-1)
    return counts.argmax(-1) + 1


def coherence(labels: np.ndarray, cell_um: float) -> tuple[float, float]:
    """(boundary mm per tissue mm², fragments per tissue mm²) of a label map (0 = background)."""
    tissue_mm2 = np.count_nonzero(labels) * (cell_um / 1000) ** 2
    edges = 0
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        edges += int(np.count_nonzero((a > 0) & (b > 0) & (a != b)))
    fragments = sum(ndimage.label(labels == k)[1] for k in np.unique(labels) if k > 0)
    return edges * cell_um / 1000 / tissue_mm2, fragments / tissue_mm2


def rim_share(labels: np.ndarray) -> float:
    """Largest share of one cluster's cells that touch glass (a 4-neighbour is background or off the map).

    Near 1 when K-means spends a cluster on a rim around the tissue (features that encode "glass nearby"
    rather than the tissue); a descriptive figure, not one of the issue's three measures.
    """
    padded = np.pad(labels, 1)
    glass_next = ((padded[:-2, 1:-1] == 0) | (padded[2:, 1:-1] == 0)
                  | (padded[1:-1, :-2] == 0) | (padded[1:-1, 2:] == 0))
    shares = [np.count_nonzero(glass_next & (labels == k)) / np.count_nonzero(labels == k)
              for k in np.unique(labels) if k > 0]
    return float(max(shares)) if shares else float("nan")


def summarise(s: RotationSeries) -> dict[str, float]:
    off = [a for a in s.angles if not is_quarter_turn(a.angle)]
    quarter = [a for a in s.angles if is_quarter_turn(a.angle) and a.angle % 360]
    ref = s.angles[0]
    cell = int(round(s.cell_um / s.core.mpp))
    stains = stain_labels(s.core.rgb, cell)
    tissue = ref.labels > 0
    boundary, fragments = coherence(ref.labels, s.cell_um)
    min_cells = int(np.ceil(MIN_SEGMENT_UM2 / s.cell_um**2))
    boundary_c, fragments_c = coherence(remove_small_segments(ref.labels, min_cells), s.cell_um)
    return {
        "agree_off": float(np.mean([a.metrics["pixel_agreement"] for a in off])),
        "dice_off": float(np.mean([a.metrics["mean_dice"] for a in off])),
        "ari_off": float(np.mean([a.metrics["adjusted_rand_index"] for a in off])),
        "agree_90": float(np.mean([a.metrics["pixel_agreement"] for a in quarter])) if quarter else float("nan"),
        "boundary_mm_per_mm2": boundary,
        "fragments_per_mm2": fragments,
        "boundary_clean": boundary_c,
        "fragments_clean": fragments_c,
        "nmi_stain": float(normalized_mutual_info_score(stains[tissue], ref.labels[tissue])),
        "rim_share": rim_share(ref.labels),
    }


def models(trained: str | None, twin: str | None, mpp: float, random_seed: int = 0) -> list[ModelUnderTest]:
    out = []
    pairs = [("sre-trained", trained, ArchSpec()), ("sre-random", "random", ArchSpec())]
    if twin:
        pairs += [("std-trained", twin, ArchSpec(kind="standard")), ("std-random", "random", ArchSpec(kind="standard"))]
    for name, w, arch in pairs:
        spec = ExtractorSpec(w, device="cpu", batch_size=1, target_mpp=mpp, kind=arch.kind, seed=random_seed)
        out.append(ModelUnderTest(name, name, spec))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trained", default=None, help="trained SRE weights (default: the packaged model)")
    ap.add_argument("--twin", default=None, help="trained standard-twin weights (optional)")
    ap.add_argument("--only", default=None, help="evaluate only images whose name starts with one of these (a,b)")
    ap.add_argument("--models", default=None, help="only these models (e.g. std-trained,std-random)")
    ap.add_argument("--random-seed", type=int, default=0,
                    help="seed of the random initialisation compared against (0: the product's --weights random)")
    ap.add_argument("--validation", action="store_true",
                    help="measure on the validation rows 1400-1780 instead of the held-out images (model selection)")
    args = ap.parse_args()
    cols = ("agree_off", "dice_off", "ari_off", "agree_90", "boundary_mm_per_mm2", "fragments_per_mm2",
            "boundary_clean", "fragments_clean", "nmi_stain", "rim_share")
    print(f"{'image':16s} {'model':12s} " + " ".join(f"{c[:14]:>14s}" for c in cols) + "  seconds")
    results: dict[tuple[str, str], dict[str, float]] = {}
    for name, slide, mpp in validation_images() if args.validation else held_out_images():
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        tissue = detect_tissue(slide, 8.0, min_area_um2=2000.0)
        area = RegionArea(name, (0.0, 0.0, float(slide.width), float(slide.height)), tissue)
        core = square_core(slide, area, mpp, tissue_mpp=8.0)
        opts = SegmentOptions(target_mpp=mpp, tile_size=256, halo=64, min_segment_um2=0.0)  # extractor batches 1
        for m in models(args.trained, args.twin, mpp, args.random_seed):
            if args.models and m.name not in args.models.split(","):
                continue
            t0 = time.perf_counter()
            series = rotation_series(core, [m], opts, ANGLES, tissue_min_area_um2=2000.0)[0]
            row = summarise(series)
            results[(name, m.name)] = row
            print(f"{name:16s} {m.name:12s} " + " ".join(f"{row[c]:14.4f}" for c in cols)
                  + f"  {time.perf_counter() - t0:7.1f}", flush=True)
    better = {"agree_off": 1, "dice_off": 1, "ari_off": 1, "boundary_mm_per_mm2": -1, "fragments_per_mm2": -1,
              "boundary_clean": -1, "fragments_clean": -1, "nmi_stain": 1}
    print("\ntrained better than random (per image; rotation = mean of agreement/Dice/ARI at off-grid angles):")
    for name in dict.fromkeys(k[0] for k in results):
        for prefix in ("sre", "std"):
            t, r = results.get((name, f"{prefix}-trained")), results.get((name, f"{prefix}-random"))
            if not t or not r:
                continue
            wins = {c: (t[c] - r[c]) * s > 0 for c, s in better.items()}
            rot = np.mean([t[c] - r[c] for c in ("agree_off", "dice_off", "ari_off")]) > 0
            coh = wins["boundary_mm_per_mm2"] and wins["fragments_per_mm2"]
            coh_c = wins["boundary_clean"] and wins["fragments_clean"]
            print(f"  {name:16s} {prefix}: rotation {rot}, coherence raw {coh} / cleaned {coh_c}, "
                  f"stain NMI {wins['nmi_stain']}")


if __name__ == "__main__":
    main()
