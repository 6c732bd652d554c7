"""The compiled border refinement gives the labels of its NumPy form (the reference), bit for bit, on real H&E:
several cluster counts and cell sizes, background cells, clusters absent from a block, blocks narrower than the
window, and flat colour (ties)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from equiseg_wsi import refine_kernel
from equiseg_wsi.refine import _SUPPORT, _smoothed, numpy_refine

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    """Real H&E (CC0 CMU-1-Small-Region crop, 256 x 256)."""
    return np.asarray(Image.open(DATA / "cmu1_small_region_x4_crop256.png").convert("RGB"))


def _cells(rgb: np.ndarray, factor: int, k: int) -> np.ndarray:
    """A cell label map from the image's grey levels: 0 for the brightest cells, then k grey bands."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    grey = rgb[: h * factor, : w * factor].mean(axis=2).reshape(h, factor, w, factor).mean(axis=(1, 3))
    edges = np.quantile(grey, np.linspace(0, 1, k + 2)[1:-1])
    return (k - np.searchsorted(edges, grey)).astype(np.int32)  # darkest cells: 1 ... brightest: 0


def _both(labels: np.ndarray, rgb: np.ndarray, factor: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    fine = np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)
    img = _smoothed(rgb[: fine.shape[0], : fine.shape[1]])
    need = _SUPPORT * (2 * factor + 1) ** 2
    return refine_kernel.refine_labels(fine, img, factor, need, k), numpy_refine(fine, img, factor, need, k)


@pytest.mark.parametrize(("factor", "k"), [(8, 3), (8, 5), (4, 3), (2, 4), (1, 3)])
def test_compiled_refinement_equals_the_numpy_form(he: np.ndarray, factor: int, k: int) -> None:
    assert refine_kernel.available()
    labels = _cells(he, factor, k)
    assert (labels == 0).any() and len(np.unique(labels)) == k + 1
    compiled, reference = _both(labels, he, factor, k)
    assert compiled.shape == reference.shape
    assert np.array_equal(compiled, reference)
    fine = np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)
    assert (compiled != fine).mean() > 0.01  # the borders did move: the comparison is not of two copies


def test_absent_clusters_narrow_blocks_and_flat_colour(he: np.ndarray) -> None:
    labels = _cells(he, 8, 3)
    labels[labels == 2] = 1  # cluster 2 absent, with k = 4 (3 and 4: 4 absent too)
    compiled, reference = _both(labels, he, 8, 4)
    assert np.array_equal(compiled, reference)
    for rows, cols in ((1, 2), (2, 1), (1, 1), (3, 7)):  # windows wider than the block: mirrored more than once
        part = labels[10 : 10 + rows, 5 : 5 + cols].copy()
        part[0, 0] = 1
        compiled, reference = _both(part, he[80:, 40:], 8, 3)
        assert np.array_equal(compiled, reference)
    flat = np.full_like(he, 180)  # every distance ties: the lower cluster id wins in both
    compiled, reference = _both(labels, flat, 8, 3)
    assert np.array_equal(compiled, reference)
