"""Clustering: sampling, canonical order, determinism, prediction, safe model files."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans

from equiseg_wsi.cluster import ClusterModel, fit_kmeans, fit_region, l2_normalise, optical_density
from equiseg_wsi.errors import EquisegError, InputError, ModelMismatchError
from equiseg_wsi.sampling import CohortSampler, ReservoirSampler, sample_positions

IDENTITY = {"model_sha256": "abc123", "layer": "layer4", "target_mpp": 2.5, "input_norm": "[-1,1]"}


def blobs(centres: np.ndarray, n_each: int, seed: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around unit-ish centres; returns features and blob index."""
    rng = np.random.default_rng(seed)
    feats = np.concatenate([c + rng.normal(0, spread, (n_each, centres.shape[1])) for c in centres])
    which = np.repeat(np.arange(len(centres)), n_each)
    return feats.astype(np.float32), which


# ------------------------------------------------------------------------------------------- basics


def test_l2_normalise_unit_rows_and_zero_safe() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], dtype=np.float32)
    y = l2_normalise(x)
    assert y.dtype == np.float32
    assert np.allclose(y[0], [0.6, 0.8])
    assert np.all(y[1] == 0) and np.all(np.isfinite(y))
    maps = l2_normalise(np.ones((2, 3, 4)))
    assert maps.shape == (2, 3, 4) and np.allclose(np.linalg.norm(maps, axis=-1), 1.0)


def test_optical_density_range() -> None:
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 255]]], dtype=np.uint8)
    od = optical_density(rgb)
    assert od.shape == (1, 3) and od.dtype == np.float32
    assert od[0, 0] == pytest.approx(0.0, abs=1e-7)
    assert od[0, 1] == pytest.approx(np.log10(256), rel=1e-6)
    assert od[0, 1] > od[0, 2] > od[0, 0]
    with pytest.raises(InputError):
        optical_density(np.zeros((4, 5)))


def test_sample_positions_seeded_without_replacement() -> None:
    mask = np.zeros((50, 40), dtype=bool)
    mask[10:30, 5:35] = True
    a = sample_positions(mask, 100, np.random.default_rng(7))
    b = sample_positions(mask, 100, 7)
    assert np.array_equal(a, b)
    assert a.size == 100 and np.unique(a).size == 100
    assert np.all(mask.ravel()[a])
    assert np.all(np.diff(a) > 0)
    every = sample_positions(mask, 10_000, 1)
    assert np.array_equal(every, np.flatnonzero(mask))
    assert not np.array_equal(a, sample_positions(mask, 100, 8))


# ------------------------------------------------------------------------------------------ samplers


def test_reservoir_deterministic_and_chunking_independent() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(1000, 4)).astype(np.float32)
    od = rng.random(1000).astype(np.float32)
    results = []
    for chunks in ([1000], [100] * 10, [1, 499, 250, 250]):
        s = ReservoirSampler(64, seed=3)
        start = 0
        for c in chunks:
            s.feed(feats[start:start + c], od[start:start + c])
            start += c
        results.append(s.result())
    for f, o in results[1:]:
        assert np.array_equal(f, results[0][0]) and np.array_equal(o, results[0][1])
    f, o = results[0]
    assert f.shape == (64, 4) and len({row.tobytes() for row in f}) == 64
    # rows keep their od and come out in stream order
    idx = [int(np.flatnonzero((feats == row).all(axis=1))[0]) for row in f]
    assert idx == sorted(idx) and np.array_equal(o, od[idx])
    other = ReservoirSampler(64, seed=4)
    other.feed(feats, od)
    assert not np.array_equal(other.result()[0], f)


def test_reservoir_small_stream_keeps_everything() -> None:
    s = ReservoirSampler(10, seed=0)
    s.feed(np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6))
    f, o = s.result()
    assert f.shape == (6, 2) and np.array_equal(o, np.arange(6))


def test_reservoir_is_uniform() -> None:
    n_rows, n_keep, trials = 1000, 100, 300
    counts = np.zeros(n_rows)
    feats = np.arange(n_rows, dtype=np.float32)[:, None]
    for t in range(trials):
        s = ReservoirSampler(n_keep, seed=t)
        for start in range(0, n_rows, 128):
            s.feed(feats[start:start + 128], np.zeros(min(128, n_rows - start)))
        counts[s.result()[0][:, 0].astype(int)] += 1
    per_block = counts.reshape(10, 100).sum(axis=1)  # expected 3000 each
    assert np.all(np.abs(per_block - 3000) < 300), per_block


def test_cohort_sampler_every_source_and_order_independent() -> None:
    rng = np.random.default_rng(1)
    cores = {name: rng.normal(size=(500, 3)).astype(np.float32) for name in ("A-1", "A-2", "B-1")}
    s1 = CohortSampler(50, seed=42)
    for name, f in cores.items():
        s1.feed(name, f, np.zeros(len(f)))
    f1, _, src1 = s1.result()
    assert f1.shape == (150, 3) and np.array_equal(np.bincount(src1), [50, 50, 50])
    s2 = CohortSampler(50, seed=42)
    for name in reversed(list(cores)):
        s2.feed(name, cores[name], np.zeros(500))
    f2, _, src2 = s2.result()
    for name in cores:  # a core's sample does not depend on the others or their order
        a = f1[src1 == s1.sources.index(name)]
        b = f2[src2 == s2.sources.index(name)]
        assert np.array_equal(a, b)
    with pytest.raises(InputError):
        CohortSampler(5, 0).result()


def test_every_source_influences_the_fit() -> None:
    """A second core with a distinct tissue class changes the cohort model (inter-subject uses all cores)."""
    eye = np.eye(6, dtype=np.float32)
    core_a, _ = blobs(np.stack([eye[0], eye[1]]), 400, seed=2)
    od_a = np.r_[np.full(400, 1.2), np.full(400, 0.3)]
    core_b, _ = blobs(np.stack([eye[2]]), 800, seed=3)
    od_b = np.full(800, 0.8)

    only_a = CohortSampler(300, seed=5)
    only_a.feed("A", core_a, od_a)
    fa, oa, _ = only_a.result()
    both = CohortSampler(300, seed=5)
    both.feed("A", core_a, od_a)
    both.feed("B", core_b, od_b)
    fb, ob, _ = both.result()

    m_a = fit_kmeans(fa, oa, 3, seed=0, sources=only_a.sources)
    m_ab = fit_kmeans(fb, ob, 3, seed=0, sources=both.sources)
    assert m_ab.sources == ["A", "B"]
    assert not np.allclose(m_a.centroids, m_ab.centroids, atol=1e-2)
    # the cohort model has a cluster for core B's class, in the middle of the OD order
    lab_b = m_ab.predict(core_b)
    assert np.all(lab_b == 2)
    assert m_ab.centroid_od == pytest.approx([1.2, 0.8, 0.3], abs=1e-6)


# ---------------------------------------------------------------------------------------- fitting


def _dark_light(seed: int, dark_first: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    eye = np.eye(5, dtype=np.float32)
    f, which = blobs(np.stack([eye[0], eye[1], eye[2]]), 200, seed=seed)
    od = np.array([1.6, 0.2, 0.9])[which]  # blob 0 dark, blob 1 light, blob 2 mid
    if not dark_first:
        f, od, which = f[::-1].copy(), od[::-1].copy(), which[::-1].copy()
    return f, od, which


def test_canonical_order_whatever_raw_kmeans_order() -> None:
    raw_first_blob = set()
    for seed in range(6):
        for dark_first in (True, False):
            f, od, which = _dark_light(seed, dark_first)
            raw = KMeans(3, n_init=1, random_state=seed).fit(l2_normalise(f))
            raw_first_blob.add(int(np.bincount(which[raw.labels_ == 0]).argmax()))
            m = fit_kmeans(f, od, 3, seed=seed, n_init=1)
            lab = m.predict(f)
            assert np.all(lab[which == 0] == 1)  # dark
            assert np.all(lab[which == 2] == 2)  # mid
            assert np.all(lab[which == 1] == 3)  # light
            assert np.all(np.diff(m.centroid_od) < 0)
    assert len(raw_first_blob) > 1  # KMeans' own ids really did vary


def test_fit_is_deterministic() -> None:
    f, od, _ = _dark_light(0, True)
    m1 = fit_kmeans(f, od, 3, seed=11, feature_identity=IDENTITY)
    m2 = fit_kmeans(f, od, 3, seed=11, feature_identity=IDENTITY)
    assert m1.centroids.tobytes() == m2.centroids.tobytes()
    assert np.array_equal(m1.predict(f), m2.predict(f))
    assert m1.to_bytes() == m2.to_bytes()


def test_predict_matches_sklearn_up_to_permutation() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 16))
    f, _ = blobs(centres, 150, seed=4, spread=0.6)
    od = rng.random(len(f))
    x = l2_normalise(f)
    ref = KMeans(4, n_init=10, random_state=9).fit(x)
    m = fit_kmeans(f, od, 4, seed=9, n_init=10)
    # same centroids, permuted
    perm = [int(np.argmin(np.abs(ref.cluster_centers_ - c).sum(axis=1))) for c in m.centroids]
    assert sorted(perm) == [0, 1, 2, 3]
    assert np.allclose(ref.cluster_centers_[perm], m.centroids, atol=1e-6)
    test = rng.normal(size=(2000, 16)).astype(np.float32) * 2
    mine = m.predict(test, chunk=333)
    theirs = ref.predict(l2_normalise(test))
    assert np.mean(np.asarray(perm)[mine - 1] == theirs) > 0.999
    assert np.array_equal(mine, m.predict(test, chunk=65536))


def test_predict_maps_and_mask() -> None:
    f, od, _ = _dark_light(1, True)
    m = fit_kmeans(f, od, 3, seed=0)
    fmap = f[:600].reshape(20, 30, 5)
    lab = m.predict(fmap)
    assert lab.shape == (20, 30) and lab.dtype == np.int32 and lab.min() >= 1 and lab.max() <= 3
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 3:] = True
    masked = m.predict(fmap, mask=mask, chunk=17)
    assert np.all(masked[~mask] == 0) and np.array_equal(masked[mask], lab[mask])
    with pytest.raises(ModelMismatchError):
        m.predict(np.zeros((4, 7), dtype=np.float32))


def test_fit_region_intra_mode() -> None:
    f, od, which = _dark_light(2, True)
    fmap = f.reshape(20, 30, 5)
    rgb = np.where((which == 0)[:, None], 60, 230).astype(np.uint8).repeat(3, 1).reshape(20, 30, 3)
    mask = np.ones((20, 30), dtype=bool)
    m = fit_region(fmap, mask, rgb, 3, n_samples=300, seed=1, source="A-1", feature_identity=IDENTITY)
    assert m.n_fit_samples == 300 and m.sources == ["A-1"]
    assert np.all(m.predict(fmap).ravel()[which == 0] == 1)


def test_too_few_distinct_samples() -> None:
    f = np.repeat(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), 50, axis=0)
    with pytest.raises(InputError, match="2 distinct"):
        fit_kmeans(f, np.zeros(100), 3, seed=0)
    with pytest.raises(EquisegError):
        fit_kmeans(np.zeros((0, 2), dtype=np.float32), np.zeros(0), 2, seed=0)
    # vectors that differ only in length are the same after normalisation
    with pytest.raises(InputError):
        fit_kmeans(np.array([[1, 0], [2, 0], [3, 0]], dtype=np.float32), np.zeros(3), 2, seed=0)


# ------------------------------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path: Path) -> None:
    f, od, _ = _dark_light(0, True)
    m = fit_kmeans(f, od, 3, seed=5, feature_identity=IDENTITY, sources=["s1/A-1", "s1/A-2"])
    p = m.save(tmp_path / "model.npz")
    back = ClusterModel.load(p)
    assert back.centroids.tobytes() == m.centroids.tobytes() and back.centroids.dtype == np.float32
    assert back.centroid_od.tobytes() == m.centroid_od.tobytes()
    assert back.metadata() == m.metadata()
    assert back.feature_identity == IDENTITY
    assert np.array_equal(back.predict(f), m.predict(f))
    # deterministic file bytes, no temporary left behind
    p2 = m.save(tmp_path / "again.npz")
    assert p.read_bytes() == p2.read_bytes()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["again.npz", "model.npz"]
    # readable in a few lines without this package
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["metadata"]))
        assert z["centroids"].shape == (3, 5)
    assert meta["k"] == 3 and meta["feature_identity"]["layer"] == "layer4"


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - the payload a hostile model file would carry
        return (Path.touch, (Path(_Evil.target),))


def test_pickled_content_is_refused(tmp_path: Path) -> None:
    _Evil.target = str(tmp_path / "pwned")
    m = fit_kmeans(*_dark_light(0, True)[:2], 3, seed=0)
    # an .npz whose metadata is a pickled object array
    bad = tmp_path / "bad.npz"
    meta = np.empty((), dtype=object)
    meta[()] = _Evil()
    np.savez(bad, centroids=m.centroids, centroid_od=m.centroid_od, metadata=meta)
    with pytest.raises(InputError, match="pickled"):
        ClusterModel.load(bad)
    # a plain pickle file
    plain = tmp_path / "model.pkl"
    plain.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(InputError):
        ClusterModel.load(plain)
    assert not (tmp_path / "pwned").exists()


def test_malformed_files_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InputError):
        ClusterModel.load(junk)
    with pytest.raises(InputError, match="not found"):
        ClusterModel.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, centroids=np.zeros((2, 2)), centroid_od=np.zeros(2), metadata=np.array('{"format": "x"}'))
    with pytest.raises(InputError, match="not an equiseg-kmeans"):
        ClusterModel.load(other)
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(InputError, match="missing"):
        ClusterModel.load(tmp_path / "empty.npz")


def test_mismatch_names_the_keys() -> None:
    f, od, _ = _dark_light(0, True)
    m = fit_kmeans(f, od, 3, seed=0, feature_identity=IDENTITY)
    m.check_compatible(dict(IDENTITY))  # same identity passes
    m.check_compatible({**IDENTITY, "target_mpp": 2.5000000000001})  # float noise passes
    with pytest.raises(ModelMismatchError, match="layer") as err:
        m.check_compatible({**IDENTITY, "layer": "layer3"})
    assert "target_mpp" not in str(err.value)
    with pytest.raises(ModelMismatchError, match="model_sha256.*target_mpp"):
        m.check_compatible({**IDENTITY, "model_sha256": "zzz", "target_mpp": 1.0})
    with pytest.raises(ModelMismatchError, match="input_norm"):
        m.check_compatible({k: v for k, v in IDENTITY.items() if k != "input_norm"})


def test_optical_density_table_equals_the_formula_for_every_colour() -> None:
    """8-bit colours go through a per-value table: bit for bit the Beer-Lambert formula, for all 2**24 colours."""
    import equiseg_wsi.cluster as cluster

    v = np.arange(256, dtype=np.uint8)
    every = np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(-1, 3)
    formula = cluster._optical_density(every)
    assert formula.dtype == np.float32
    assert np.array_equal(optical_density(every), formula)
    rgba = np.concatenate([every[:1000], np.full((1000, 1), 7, np.uint8)], axis=1)
    assert np.array_equal(optical_density(rgba), formula[:1000])  # alpha ignored
    expected = -np.log10((every[:5000].astype(np.float64) + 1) / 256).mean(axis=1)
    assert np.allclose(formula[:5000], expected, rtol=1e-6, atol=1e-6)
