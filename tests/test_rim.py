"""The rim mechanism: KMeans is fitted on interior tissue cells, so edge cells cannot take a cluster of their own."""

from __future__ import annotations

import numpy as np

from equiseg_wsi.cluster import fit_region
from equiseg_wsi.segment import fit_cells


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
