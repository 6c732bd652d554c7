"""Biomarkers: exact values on hand-made label maps, finiteness, CSV determinism, rotation deltas."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from equiseg_wsi.biomarkers import (
    COLUMN_DOCS,
    IDENTITY_COLUMNS,
    biomarker_columns,
    biomarker_deltas,
    column_docs,
    compute_biomarkers,
    segment_measurements,
    write_csv,
)
from equiseg_wsi.cluster import OD_TABLE, optical_density
from equiseg_wsi.errors import InputError

IDENT = {"slide": "slide001", "region": "A-1", "grid_row": 1, "grid_column": 1, "source_path": "x/slide001.svs"}


def grey(h: int, w: int, v: int = 200) -> np.ndarray:
    return np.full((h, w, 3), v, dtype=np.uint8)


def test_square_exact_values() -> None:
    lab = np.zeros((10, 10), dtype=np.int32)
    lab[2:6, 3:7] = 1  # 4x4 square inside background
    row = compute_biomarkers(lab, grey(10, 10), 3, 2.0, IDENT)
    assert list(row) == biomarker_columns(3)
    assert row["tissue_area_um2"] == 64.0
    assert row["c1_area_um2"] == 64.0 and row["c1_fraction"] == 1.0
    assert row["c1_n_components"] == 1
    assert row["c1_mean_component_area_um2"] == 64.0
    assert row["c1_perimeter_um"] == 32.0  # 16 unit edges x 2 µm
    assert row["c1_fragmentation"] == 16.0
    assert row["entropy_bits"] == 0.0
    for i in (2, 3):  # absent clusters: zeros, not NaN
        for name in ("area_um2", "fraction", "n_components", "mean_component_area_um2", "perimeter_um",
                     "fragmentation", "mean_r", "mean_g", "mean_b", "mean_od"):
            assert row[f"c{i}_{name}"] == 0
    assert row["boundary_1_2_fraction"] == row["boundary_1_3_fraction"] == row["boundary_2_3_fraction"] == 0.0
    assert row["slide"] == "slide001" and row["case_id"] == "" and row["grid_row"] == 1


def test_image_border_counts_as_background() -> None:
    lab = np.ones((3, 3), dtype=np.int32)
    row = compute_biomarkers(lab, grey(3, 3), 1, 1.0, {})
    assert row["c1_perimeter_um"] == 12.0 and row["c1_area_um2"] == 9.0


def test_components_fractions_and_colours() -> None:
    lab = np.zeros((6, 6), dtype=np.int32)
    lab[0:2, 0:2] = 1
    lab[2:4, 2:4] = 1  # touches the first square only at a corner: 4-connectivity gives 2 pieces
    lab[4:6, :] = 2
    rgb = grey(6, 6, 220)
    rgb[lab == 1] = (100, 50, 150)
    row = compute_biomarkers(lab, rgb, 2, 0.5, {"core": "B-3"})
    assert row["region"] == "B-3"
    assert row["c1_n_components"] == 2 and row["c2_n_components"] == 1
    assert row["c1_area_um2"] == 8 * 0.25 and row["c1_mean_component_area_um2"] == 4 * 0.25
    assert row["c1_fraction"] + row["c2_fraction"] == pytest.approx(1.0)
    assert row["c1_fraction"] == pytest.approx(8 / 20)
    assert (row["c1_mean_r"], row["c1_mean_g"], row["c1_mean_b"]) == (100.0, 50.0, 150.0)
    assert row["c2_mean_r"] == 220.0
    expected_od = np.mean([-math.log10((v + 1) / 256) for v in (100, 50, 150)])
    assert row["c1_mean_od"] == pytest.approx(expected_od, rel=1e-6)
    assert row["c1_mean_od"] > row["c2_mean_od"]
    assert row["c1_perimeter_um"] == 16 * 0.5
    assert row["c2_perimeter_um"] == 16 * 0.5
    seg = segment_measurements(lab, 2, 0.5)
    assert seg[1] == {"area_um2": 2.0, "fraction_of_region": 0.4, "n_components": 2.0}
    assert seg[2]["n_components"] == 1.0 and all(isinstance(v, float) for v in seg[2].values())


def test_entropy_of_equal_fractions_is_log2_k() -> None:
    lab = np.repeat(np.arange(1, 5, dtype=np.int32), 4)[None, :].repeat(3, axis=0)  # 4 equal stripes
    row = compute_biomarkers(lab, grey(3, 16), 4, 1.0, {})
    assert row["entropy_bits"] == pytest.approx(2.0)
    assert all(row[f"c{i}_fraction"] == 0.25 for i in range(1, 5))


def test_boundary_fractions_hand_counted() -> None:
    lab = np.array(
        [
            [1, 1, 2],
            [1, 1, 2],
            [3, 3, 2],
        ],
        dtype=np.int32,
    )
    row = compute_biomarkers(lab, grey(3, 3), 3, 1.0, {})
    # edges 1|2: 2, 1|3: 2, 2|3: 1 -> total 5
    assert row["boundary_1_2_fraction"] == pytest.approx(2 / 5)
    assert row["boundary_1_3_fraction"] == pytest.approx(2 / 5)
    assert row["boundary_2_3_fraction"] == pytest.approx(1 / 5)
    total = sum(v for k, v in row.items() if k.startswith("boundary_"))
    assert total == pytest.approx(1.0)
    # background edges do not enter the inter-cluster boundary
    padded = np.pad(lab, 2)
    row2 = compute_biomarkers(padded, grey(7, 7), 3, 1.0, {})
    assert row2["boundary_1_2_fraction"] == row["boundary_1_2_fraction"]


def test_random_maps_are_finite_and_consistent() -> None:
    rng = np.random.default_rng(0)
    for k in (1, 3, 6):
        lab = rng.integers(0, k + 1, size=(40, 30)).astype(np.int32)
        rgb = rng.integers(0, 256, size=(40, 30, 3)).astype(np.uint8)
        row = compute_biomarkers(lab, rgb, k, 20.0, IDENT)
        nums = [v for c, v in row.items() if c not in IDENTITY_COLUMNS]
        assert all(math.isfinite(v) for v in nums)
        assert sum(row[f"c{i}_fraction"] for i in range(1, k + 1)) == pytest.approx(1.0)
        if k > 1:
            assert sum(v for c, v in row.items() if c.startswith("boundary_")) == pytest.approx(1.0)
    empty = compute_biomarkers(np.zeros((5, 5), dtype=np.int32), grey(5, 5), 3, 1.0, {})
    assert all(math.isfinite(v) for c, v in empty.items() if c not in IDENTITY_COLUMNS)
    assert empty["tissue_area_um2"] == 0.0 and empty["entropy_bits"] == 0.0


def test_columns_are_documented() -> None:
    docs = column_docs(3)
    assert list(docs) == biomarker_columns(3)
    assert all(docs[c] for c in docs)
    assert "clusters 1 and 3" in docs["boundary_1_3_fraction"]
    assert "cluster 2" in docs["c2_mean_od"]
    assert "c{i}_area_um2" in COLUMN_DOCS


def test_bad_input_is_refused() -> None:
    lab = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(InputError):
        compute_biomarkers(lab + 4, grey(4, 4), 3, 1.0, {})
    with pytest.raises(InputError):
        compute_biomarkers(lab, grey(4, 5), 3, 1.0, {})
    with pytest.raises(InputError):
        compute_biomarkers(lab, grey(4, 4), 3, 0.0, {})
    with pytest.raises(InputError):
        compute_biomarkers(lab.astype(float), grey(4, 4), 3, 1.0, {})
    with pytest.raises(InputError, match="unknown identity"):
        compute_biomarkers(lab, grey(4, 4), 3, 1.0, {"patient": "x"})


def test_csv_round_trip_and_byte_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for n in range(3):
        lab = rng.integers(0, 4, size=(12, 12)).astype(np.int32)
        rows.append(compute_biomarkers(lab, grey(12, 12), 3, 0.3, {**IDENT, "region": f"A-{n + 1}"}))
    p = write_csv(tmp_path / "out" / "biomarkers.csv", rows)
    with open(p, newline="", encoding="utf-8") as fh:
        back = list(csv.DictReader(fh))
    assert [list(r) for r in back] == [list(r) for r in rows]
    for orig, read in zip(rows, back, strict=True):
        for col, v in orig.items():
            if isinstance(v, float):
                assert float(read[col]) == v  # exact round trip
            else:
                assert read[col] == str(v)
    first = p.read_bytes()
    write_csv(p, rows)
    assert p.read_bytes() == first
    assert b"\r" not in first and not first.endswith(b"\n\n")
    assert sorted(x.name for x in p.parent.iterdir()) == ["biomarkers.csv"]  # no temporary left behind
    with pytest.raises(InputError):
        write_csv(tmp_path / "bad.csv", [rows[0], {"x": 1}])


def test_biomarker_deltas() -> None:
    base = {"slide": "s", "region": "A-1", "n_clusters": 2, "cell_size_um": 1.0, "c1_fraction": 0.5,
            "c2_fraction": 0.5, "c2_area_um2": 0.0}
    rows = {
        0: base,
        90: {**base, "c1_fraction": 0.6, "c2_fraction": 0.4},
        180: {**base, "c1_fraction": 0.4, "c2_fraction": 0.6},
    }
    d = biomarker_deltas(rows)
    assert list(d) == ["c1_fraction_max_abs_delta", "c1_fraction_cv", "c2_fraction_max_abs_delta", "c2_fraction_cv",
                       "c2_area_um2_max_abs_delta", "c2_area_um2_cv"]
    assert d["c1_fraction_max_abs_delta"] == pytest.approx(0.1)
    assert d["c1_fraction_cv"] == pytest.approx(np.std([0.5, 0.6, 0.4]) / 0.5)
    assert d["c2_area_um2_cv"] == 0.0
    with pytest.raises(InputError, match="angle 0"):
        biomarker_deltas({90: base})


def reference_sums(lab: np.ndarray, rgb: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """The NumPy form the compiled pass replaced: one weighted `np.bincount` per sum."""
    flat = lab.ravel()
    od = optical_density(rgb).astype(np.float64).ravel()
    sums = [np.bincount(flat, weights=weight, minlength=k + 1)]
    sums += [np.bincount(flat, weights=rgb[..., c].astype(np.float64).ravel() * weight, minlength=k + 1)
             for c in range(3)]
    sums.append(np.bincount(flat, weights=od * weight, minlength=k + 1))
    return np.stack(sums)


def reference_edges(lab: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(lab, 1)
    per, pair = np.zeros(k + 1, np.int64), np.zeros((k + 1) ** 2, np.int64)
    for a, b in ((p[:, :-1], p[:, 1:]), (p[:-1, :], p[1:, :])):
        av, bv = a[a != b], b[a != b]
        per += np.bincount(av, minlength=k + 1) + np.bincount(bv, minlength=k + 1)
        both = (av > 0) & (bv > 0)
        pair += np.bincount(np.minimum(av, bv)[both] * (k + 1) + np.maximum(av, bv)[both], minlength=(k + 1) ** 2)
    return per, pair.reshape(k + 1, k + 1)


def test_compiled_sums_equal_numpys_bit_for_bit() -> None:
    """The table's sums (weights, colours, optical density, edges) equal the bincount form exactly, on real H&E
    with coverage weights and on random maps touching every border."""
    from PIL import Image

    from equiseg_wsi.measure_compiled import cluster_sums, edge_counts

    rgb_real = np.asarray(Image.open(Path(__file__).parent / "data" / "cmu1_small_region_x4_crop256.png")
                          .convert("RGB"))
    rng = np.random.default_rng(11)
    cases = [(np.clip(rgb_real.mean(axis=2).astype(np.int32) // 60, 0, 3), rgb_real, 3)]
    cases += [(rng.integers(0, k + 1, (h, w)).astype(np.int32), rng.integers(0, 256, (h, w, 3), dtype=np.uint8), k)
              for k, h, w in ((1, 1, 1), (2, 1, 17), (5, 23, 9), (7, 40, 41))]
    for lab, rgb, k in cases:
        for weight in (np.ones(lab.size), rng.random(lab.size)):
            got = cluster_sums(lab.ravel(), rgb.reshape(-1, 3), weight, OD_TABLE, k)
            assert np.array_equal(got, reference_sums(lab, rgb, weight, k))
        per, pair = edge_counts(lab, k)
        ref_per, ref_pair = reference_edges(lab, k)
        assert np.array_equal(per, ref_per) and np.array_equal(pair, ref_pair)
