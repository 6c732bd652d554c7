"""Every option that decides a run's outputs, with its default and its validation rule, defined once.

The command line takes its defaults from these dataclasses, and constructing one checks every rule, so a bad
value or combination fails before any model is loaded, with a message naming the command-line option.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from equiseg_wsi.errors import InputError
from equiseg_wsi.models.arch import DEFAULT_LAYER, default_arch
from equiseg_wsi.slide import BACKENDS, PLAUSIBLE_MPP
from equiseg_wsi.tissue import DEFAULT_TISSUE_MPP

__all__ = [
    "DEFAULT_MIN_TISSUE_AREA_UM2",
    "CLUSTERING_MODES",
    "GLASS_MODES",
    "REFINE_MODES",
    "DEFAULT_MODEL_SEED",
    "DEFAULT_TARGET_MPP",
    "ExtractorSpec",
    "RegionOptions",
    "RunJob",
    "RunOptions",
    "SegmentOptions",
]

# µm/px the model sees: the packaged model was trained at about 1 µm/px (EBHI-Seg), where 8-µm cells resolve glands;
# on the segmentation benchmark's development cases 1.0 beat 1.25 and 2.0 (docs/model_card.md). The paper's
# setting (5,000 px cores at 0.25 µm/px resized to 512 px) is --target-mpp 2.5: 6x faster, coarser segments.
DEFAULT_TARGET_MPP = 1.0
DEFAULT_MIN_TISSUE_AREA_UM2 = 20000.0  # tissue pieces of a whole slide smaller than this are debris, not regions
MAX_CLUSTERS = 20
GLASS_MODES = ("keep", "fill")
REFINE_MODES = ("none", "colour")
CLUSTERING_MODES = ("run", "slide", "region")


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise InputError(f"{option}: {message}")


def _choice(value: str, choices: tuple[str, ...], option: str) -> None:
    _check(value in choices, option, f"must be one of {', '.join(choices)}, got {value!r}")


def _positive(value: float, option: str) -> None:
    _check(math.isfinite(value) and value > 0, option, f"must be a positive number, got {value}")


def _non_negative(value: float, option: str) -> None:
    _check(math.isfinite(value) and value >= 0, option, f"must be a non-negative number, got {value}")


@dataclass(frozen=True)
class SegmentOptions:
    """How a region is segmented: features at `target_mpp`, KMeans, clean-up. Units in the names."""

    n_clusters: int = 3
    n_samples: int = 2000  # tissue cells sampled per region to fit KMeans
    seed: int = 42
    target_mpp: float = DEFAULT_TARGET_MPP  # µm/px the model sees
    tile_size: int = 1536  # largest tile interior, px at target_mpp: a 1.3-mm core at 1 µm/px is one tile
    halo: int | None = None  # px at target_mpp; None: the extractor's recommended halo
    min_segment_um2: float = 250.0  # smaller segments join their longest-border neighbour (benchmark: 100-250 best)
    min_cell_tissue: float = 0.5  # share of a feature cell that must be tissue for the cell to be labelled
    glass: str = "fill"  # what the network sees outside the tissue: "fill" (tissue colour) or "keep" (as scanned)
    refine: str = "colour"  # segment borders: "colour" (image edges, <= 2 µm px) or "none" (the feature-cell grid)

    def __post_init__(self) -> None:
        k = self.n_clusters
        _check(2 <= k <= MAX_CLUSTERS, "--n-clusters", f"must be 2..{MAX_CLUSTERS}, got {k}")
        _check(self.n_samples >= 10, "--n-samples", f"must be at least 10, got {self.n_samples}")
        _positive(self.target_mpp, "--target-mpp")
        _check(self.tile_size >= 64, "--tile-size", f"must be at least 64 px, got {self.tile_size}")
        if self.halo is not None:
            _check(self.halo >= 0, "--halo", f"must be >= 0 px, got {self.halo}")
        _non_negative(self.min_segment_um2, "--min-area")
        _choice(self.glass, GLASS_MODES, "--glass")
        _choice(self.refine, REFINE_MODES, "--refine")
        _check(0 < self.min_cell_tissue <= 1, "min_cell_tissue", f"must be in (0, 1], got {self.min_cell_tissue}")

    def check_stride(self, stride: int) -> None:
        """Tiles and halo must be whole multiples of the coarsest stride of the chosen layer(s) (`stride` px)."""
        _check(self.tile_size % stride == 0, "--tile-size",
               f"{self.tile_size} px is not a multiple of the feature stride {stride} px")
        if self.halo is not None:
            _check(self.halo % stride == 0, "--halo",
                   f"{self.halo} px is not a multiple of the feature stride {stride} px")


@dataclass(frozen=True)
class RegionOptions:
    """How slides are opened and split into regions (cores, TMA grid cores or tissue pieces)."""

    backend: str = "auto"
    mpp: float | None = None  # µm/px for files without resolution metadata
    tissue_mpp: float = DEFAULT_TISSUE_MPP  # resolution of the tissue mask
    min_tissue_area_um2: float = DEFAULT_MIN_TISSUE_AREA_UM2
    tma: bool | None = None  # None: dearray whole slides that look like a TMA; True/False: always/never
    core_diameter_um: float | None = None  # TMA core diameter; None: estimated

    def __post_init__(self) -> None:
        _choice(self.backend, BACKENDS, "--backend")
        if self.mpp is not None:
            lo, hi = PLAUSIBLE_MPP
            _check(math.isfinite(self.mpp) and lo <= self.mpp <= hi, "--mpp",
                   f"{self.mpp} µm/px is outside {lo}..{hi}")
        _positive(self.tissue_mpp, "--tissue-mpp")
        _non_negative(self.min_tissue_area_um2, "--min-tissue-area")
        if self.core_diameter_um is not None:
            _positive(self.core_diameter_um, "--core-diameter")


@dataclass(frozen=True)
class RunOptions:
    """Everything that decides a run's outputs (recorded in the manifest)."""

    segment: SegmentOptions = field(default_factory=SegmentOptions)
    regions: RegionOptions = field(default_factory=RegionOptions)
    simplify_cells: float = 0.0  # polygon simplification tolerance, in feature cells (0: exact cell edges)
    apply_bounds_offset: bool = True  # subtract OpenSlide bounds-x/-y so GeoJSON lands where QuPath shows it
    overwrite: bool = False
    case_ids: dict[str, str] = field(default_factory=dict)  # TMA core name -> case id
    clustering: str = "run"  # one KMeans for the whole run ("run"), per slide ("slide") or per region ("region")
    cluster_names: tuple[str, ...] = ()  # QuPath class names of clusters 1..K (default "Cluster i")

    def __post_init__(self) -> None:
        _non_negative(self.simplify_cells, "--simplify")
        _choice(self.clustering, CLUSTERING_MODES, "--clustering")
        if self.cluster_names:
            _check_cluster_names(tuple(self.cluster_names), self.segment.n_clusters)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_cluster_names(names: tuple[str, ...], k: int) -> None:
    """One name per cluster; each non-empty, unique, without ':' or a newline (QuPath splits class names there)."""
    _check(len(names) == k, "--cluster-names",
           f"{len(names)} name(s) given for {k} clusters (--n-clusters, or the K of --kmeans-model)")
    for name in names:
        _check(isinstance(name, str) and bool(name.strip()), "--cluster-names", f"empty name in {list(names)}")
        _check(not any(c in name for c in ":\n\r"), "--cluster-names",
               f"{name!r} must not contain ':' or a newline (QuPath splits class names there)")
    _check(len(set(names)) == len(names), "--cluster-names", f"names must be unique, got {list(names)}")


DEFAULT_MODEL_SEED = 0  # seed of the random initialisation (`--weights random`)


@dataclass(frozen=True)
class ExtractorSpec:
    """How to build the feature model, here or in another process (a Dask worker); build it with
    `equiseg_wsi.features.build_extractor`.

    `weights`: a file, None for the packaged trained model of `kind` (seeded random init when none is
    installed), or "random" for the seeded random initialisation. `layer` may join several layers with '+'.
    The resolution the model sees is part of the features' identity: the same model at another µm/px gives
    features that are not comparable.
    """

    weights: str | None = None
    layer: str = DEFAULT_LAYER
    device: str = "auto"
    batch_size: int | None = None  # None: 1 on CPU, 16 on a GPU
    target_mpp: float = DEFAULT_TARGET_MPP
    kind: str = "sre"  # "sre" or "standard" (the twin), for the packaged or random weights
    seed: int = DEFAULT_MODEL_SEED

    def __post_init__(self) -> None:
        _positive(self.target_mpp, "--target-mpp")
        _check(self.batch_size is None or self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.device == "auto" or self.device in ("cpu", "mps") or self.device.startswith("cuda"), "--device",
               f"must be auto, cpu, cuda or mps, got {self.device!r}")

    def layers(self) -> list[str]:
        return [name.strip() for name in self.layer.split("+") if name.strip()]

    def strides(self) -> list[int]:
        """Pixels per feature cell of each layer in `layer`, known without loading any weights."""
        strides = default_arch(self.kind).layer_strides()
        names = self.layers()
        if not names or any(n not in strides for n in names):
            raise InputError(f"--layer: unknown feature layer {self.layer!r}; choose from {sorted(strides)}")
        return [strides[n] for n in names]

    def stride(self) -> int:
        """Pixels per feature cell (the finest stride among the layers)."""
        return min(self.strides())


@dataclass(frozen=True)
class RunJob:
    """What every region of a run needs: how to build the feature model, the options, and optionally a saved
    cohort KMeans model to apply instead of fitting one per region. Small enough to send to a worker."""

    spec: ExtractorSpec
    options: RunOptions = field(default_factory=RunOptions)
    kmeans_model: str | None = None  # path of a model written by `equiseg fit` (or the run's own, run_model)
    feature_cache: str | None = None  # folder where region features wait between a run-wide fit and segmentation

    def __post_init__(self) -> None:
        if not math.isclose(self.spec.target_mpp, self.options.segment.target_mpp):
            raise InputError(f"--target-mpp: the model is set up for {self.spec.target_mpp} µm/px but regions are "
                             f"read at {self.options.segment.target_mpp} µm/px")

    def check(self) -> None:
        """Every rule that needs the model's layer (not its weights): fails before any weights are loaded."""
        self.options.segment.check_stride(max(self.spec.strides()))
