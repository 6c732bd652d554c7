"""The NumPy k-means against scikit-learn (the reference): same optimum on separable data, no worse inertia
on real SRE features, deterministic for a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from equiseg_wsi.cluster import l2_normalise
from equiseg_wsi.kmeans import kmeans

CORE = Path(__file__).resolve().parents[1] / "sample_data" / "cores" / "slide002_core001.jpg"


@pytest.fixture(scope="module")
def core_features() -> np.ndarray:
    from equiseg_wsi.features import FeatureExtractor

    ex = FeatureExtractor.from_weights(None, device="cpu", batch_size=1, target_mpp=1.0)
    img = np.asarray(Image.open(CORE).convert("RGB").reduce(2))
    h, w = img.shape[0] // 8 * 8, img.shape[1] // 8 * 8
    f = ex.extract_image(np.ascontiguousarray(img[:h, :w]), tile=512)
    x = l2_normalise(f.reshape(-1, f.shape[-1]))
    return x[np.random.default_rng(0).choice(len(x), 2000, replace=False)]


def test_separable_blobs_give_the_reference_partition() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 32)) * 4
    x = np.concatenate([c + rng.normal(size=(200, 32)) * 0.3 for c in centres])
    ours = kmeans(x, 4, n_init=5, seed=3)
    ref = KMeans(4, n_init=5, random_state=3).fit(x)
    assert adjusted_rand_score(ref.labels_, ours.labels) == 1.0
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-9)


@pytest.mark.parametrize("k", [3, 5])
def test_real_features_inertia_matches_the_reference(core_features: np.ndarray, k: int) -> None:
    ours = kmeans(core_features, k, n_init=10, seed=42)
    ref = KMeans(k, n_init=10, random_state=42).fit(core_features)
    assert ours.inertia <= ref.inertia_ * 1.005  # a local optimum as good as scikit-learn's, within 0.5 %
    assert adjusted_rand_score(ref.labels_, ours.labels) > 0.7


def test_deterministic_and_best_of_starts(core_features: np.ndarray) -> None:
    a = kmeans(core_features, 3, n_init=4, seed=7)
    b = kmeans(core_features, 3, n_init=4, seed=7)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centers, b.centers)
    singles = [kmeans(core_features, 3, n_init=1, seed=s).inertia for s in range(4)]
    assert a.inertia <= max(singles)
    # labels are the nearest centre of the returned centres
    d = ((core_features[:, None, :].astype(np.float64) - a.centers[None]) ** 2).sum(-1)
    assert np.array_equal(np.argmin(d, axis=1), a.labels)


def test_blas_runs_on_one_thread_inside_the_fit_and_the_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenBLAS's spinning threads made a fit 39x slower on a busy 2-core machine (equiseg_wsi.blas)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import equiseg_wsi.kmeans as km
    from equiseg_wsi.cluster import ClusterModel

    seen: list[int] = []
    real = km._sq_dist

    def spy(*args: np.ndarray) -> np.ndarray:
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return real(*args)

    monkeypatch.setattr(km, "_sq_dist", spy)
    x = np.random.default_rng(0).normal(size=(300, 8))
    with threadpool_limits(limits=2, user_api="blas"):
        km.kmeans(x, 3, n_init=2)
        assert seen and set(seen) == {1}
        model = ClusterModel(centroids=l2_normalise(x[:3]).astype(np.float32), k=3)
        seen.clear()
        monkeypatch.setattr(ClusterModel, "_assign", staticmethod(lambda *a: seen.extend(
            i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")))
        model.predict(x.astype(np.float32))
        assert set(seen) == {1}
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}  # restored


def test_starts_run_two_at_a_time_with_the_result_of_one_at_a_time(core_features: np.ndarray,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The starts are drawn in order before the Lloyd runs, which then run on two threads: the fit is the one
    of seeding and running each start in turn, bit for bit."""
    import equiseg_wsi.kmeans as km

    x = core_features.astype(np.float64)
    x_sq = np.einsum("nc,nc->n", x, x)
    threshold = 1e-4 * float(x.var(axis=0).mean())
    rng = np.random.default_rng(3)
    runs = [km._lloyd(x, x_sq, km._seed(x, x_sq, 4, rng), 300, threshold) for _ in range(5)]  # one at a time
    best = min(range(5), key=lambda i: (runs[i][2], i))
    monkeypatch.setattr(km, "THREADED_ELEMENTS", 0)
    used: list[int] = []
    real_map = km.ordered_map
    monkeypatch.setattr(km, "ordered_map",
                        lambda f, items, threads: used.append(threads) or real_map(f, items, threads))
    fit = km.kmeans(core_features, 4, n_init=5, seed=3)
    assert used == [km.LLOYD_THREADS] and km.LLOYD_THREADS == 2
    assert np.array_equal(fit.centers, runs[best][0]) and np.array_equal(fit.labels, runs[best][1])
    assert fit.inertia == runs[best][2]
