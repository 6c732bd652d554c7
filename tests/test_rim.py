"""The rim mechanisms: KMeans is fitted on interior tissue cells, and edge cells are predicted with the region's
edge-minus-interior feature shift taken off, so edge cells cannot take a cluster of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from equiseg_wsi.cluster import ClusterModel, fit_region
from equiseg_wsi.segment import edge_corrected_labels, fit_cells

REPO = Path(__file__).resolve().parents[1]


def _disc(n: int = 40, r: float = 17.0) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    return (yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 <= r * r


def test_fit_cells_are_the_interior() -> None:
    tissue = _disc()
    inner = fit_cells(tissue, 3)
    assert inner.sum() > 0 and not (inner & ~tissue).any()
    for r, c in zip(*np.nonzero(inner), strict=True):  # no background or map edge among the 8 neighbours
        assert 0 < r < tissue.shape[0] - 1 and 0 < c < tissue.shape[1] - 1
        assert tissue[r - 1 : r + 2, c - 1 : c + 2].all()
    edge = tissue & ~inner
    assert edge.sum() > 0
    full = np.ones((20, 20), bool)  # the map edge counts as glass too
    assert not fit_cells(full, 3)[0].any() and fit_cells(full, 3)[1:-1, 1:-1].all()


def test_thin_tissue_uses_every_cell() -> None:
    strip = np.zeros((30, 30), bool)
    strip[10:13, :] = True  # three cells thick: only one interior row, under a quarter of the tissue
    assert np.array_equal(fit_cells(strip, 3), strip)


def test_fit_cells_commute_with_quarter_turns() -> None:
    rng = np.random.default_rng(0)
    tissue = _disc() & (rng.random((40, 40)) > 0.05)
    for k in (1, 2, 3):
        assert np.array_equal(fit_cells(np.rot90(tissue, k), 3), np.rot90(fit_cells(tissue, 3), k))
    assert np.array_equal(fit_cells(tissue[:, ::-1], 3), fit_cells(tissue, 3)[:, ::-1])


def test_edge_cells_with_their_own_features_get_no_cluster_of_their_own() -> None:
    """Two interior tissue classes and edge cells whose features differ (what glass in the receptive field does):
    fitted on every cell, one of K = 3 clusters is the rim; fitted on the interior, the rim splits between the two
    tissue clusters."""
    rng = np.random.default_rng(1)
    tissue = _disc()
    inner = fit_cells(tissue, 3)
    edge = tissue & ~inner
    cls = np.zeros(tissue.shape, int)
    cls[:, 20:] = 1
    protos = np.eye(8)[:3] * 4.0
    feats = protos[cls] + rng.normal(scale=0.3, size=(40, 40, 8))
    feats[edge] = 0.5 * feats[edge] + protos[2] * 0.9  # edge cells: pulled towards a third direction
    rgb = np.full((40, 40, 3), 128, np.uint8)

    def rim_share(mask: np.ndarray) -> float:
        model = fit_region(feats.astype(np.float32), mask, rgb, 3, 2000, 42)
        labels = model.predict(feats.astype(np.float32), mask=tissue)
        return max(float((labels[edge] == c).sum() / max(1, (labels == c).sum())) for c in (1, 2, 3))

    assert rim_share(tissue) > 0.9  # a rim cluster: almost all its cells are edge cells
    assert rim_share(inner) < 0.6


def _shifted_edges(turns: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, ClusterModel]:
    """A disc of two tissue classes (left A, right B) under a run-wide model of three (A, B, C) whose edge cells
    are shifted towards C, as glass in the receptive field shifts them: C is rare inside, a rim at the edges."""
    rng = np.random.default_rng(2)
    tissue = _disc()
    inner = fit_cells(tissue, 3)
    cls = np.zeros(tissue.shape, int)
    cls[:, 20:] = 1
    protos = np.eye(8)[:3]
    feats = protos[cls] + rng.normal(scale=0.05, size=(40, 40, 8))
    feats[tissue & ~inner] += 1.2 * protos[2]
    model = ClusterModel(centroids=protos.astype(np.float32), k=3)
    feats, tissue, cls = (np.ascontiguousarray(np.rot90(a, turns)) for a in (feats, tissue, cls))
    return feats.astype(np.float32), tissue, cls + 1, model


def test_edge_cells_take_the_class_of_the_tissue_they_show() -> None:
    feats, tissue, cls, model = _shifted_edges()
    edge = tissue & ~fit_cells(tissue, 3)
    plain = model.predict(feats, mask=tissue)
    assert (plain[edge] == 3).mean() > 0.9  # without the correction, the edge is a cluster of its own
    labels = edge_corrected_labels(feats, tissue, plain, model)
    assert (labels[edge] == cls[edge]).mean() > 0.95
    assert np.array_equal(labels[~edge], plain[~edge])  # interior cells keep their labels
    assert np.array_equal(labels == 0, ~tissue)


def test_edge_correction_commutes_with_quarter_turns() -> None:
    feats, tissue, _cls, model = _shifted_edges()
    labels = edge_corrected_labels(feats, tissue, model.predict(feats, mask=tissue), model)
    for k in (1, 2, 3):
        f, t, _c, _m = _shifted_edges(k)
        assert np.array_equal(edge_corrected_labels(f, t, model.predict(f, mask=t), model), np.rot90(labels, k))
    f, t = np.ascontiguousarray(feats[:, ::-1]), np.ascontiguousarray(tissue[:, ::-1])
    assert np.array_equal(edge_corrected_labels(f, t, model.predict(f, mask=t), model), labels[:, ::-1])


def test_thin_tissue_is_left_as_predicted() -> None:
    strip = np.zeros((30, 30), bool)
    strip[10:13, :] = True  # no interior to compare with (fit_cells uses every cell)
    feats = np.random.default_rng(3).normal(size=(30, 30, 8)).astype(np.float32)
    model = ClusterModel(centroids=np.eye(8, dtype=np.float32)[:3], k=3)
    plain = model.predict(feats, mask=strip)
    assert np.array_equal(edge_corrected_labels(feats, strip, plain, model), plain)


def test_segment_region_corrects_edge_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline labels a region through the correction (with the run's model and in every mode)."""
    import equiseg_wsi.segment as segment

    calls: list[tuple[int, int]] = []
    original = segment.edge_corrected_labels

    def spy(features: np.ndarray, tissue: np.ndarray, labels: np.ndarray, model: ClusterModel) -> np.ndarray:
        calls.append(tissue.shape)
        return original(features, tissue, labels, model)

    monkeypatch.setattr(segment, "edge_corrected_labels", spy)
    from equiseg_wsi.features import build_extractor
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.options import ExtractorSpec, RegionOptions, SegmentOptions
    from equiseg_wsi.regions import open_regions

    options = SegmentOptions(target_mpp=4.0, tile_size=128, refine="none")
    extractor = build_extractor(ExtractorSpec(device="cpu", target_mpp=4.0))
    source = collect_inputs([REPO / "sample_data" / "cores" / "slide001_core001.jpg"], mpp=0.499)[0]
    with open_regions(source, RegionOptions(mpp=0.499)) as (slide, found):
        seg = segment.segment_region(slide, found.areas[0], extractor, options)
    assert calls and calls[0] == seg.labels.shape
