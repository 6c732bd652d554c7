"""KMeans on SRE features: fitting, canonical cluster order, prediction and safe model files.

Why this module exists: KMeans ids are arbitrary, so the fitted centroids are put in a canonical order by
optical density (cluster 1 = darkest). "Cluster 1" then means the same tissue class across cores, runs and
machines, and a cohort model applied to other cores gives comparable ids. (Seeded sampling of the rows to fit
on lives in ``sampling``.)

Model file format (``.npz``, a plain zip of ``.npy`` arrays; never pickled; readable without this package)::

    import json, numpy as np
    with np.load("model.npz", allow_pickle=False) as z:
        centroids = z["centroids"]                 # (K, C) float32, row i-1 = "Cluster i"
        centroid_od = z["centroid_od"]             # (K,) float64, mean optical density per cluster
        meta = json.loads(str(z["metadata"]))      # k, normalisation, feature_identity, seed, sources, ...
    # labels = 1 + argmin_k || x/||x|| - centroids[k] ||  for every feature vector x
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .blas import one_blas_thread
from .errors import InputError, ModelMismatchError
from .export.atomic import atomic_write_bytes
from .kmeans import kmeans
from .sampling import sample_positions, source_rng

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OD_TABLE",
    "ClusterModel",
    "fit_kmeans",
    "fit_region",
    "l2_normalise",
    "optical_density",
]

FORMAT_NAME = "equiseg-kmeans"
FORMAT_VERSION = 1

_EPS = 1e-12
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same model gives the same file bytes


# --------------------------------------------------------------------------------------------- basics


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Scale each feature vector (last axis) to unit length, as the paper does before KMeans.

    Zero vectors stay zero instead of becoming NaN, so empty/padded positions never poison a fit.
    Returns float32.
    """
    a = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("...c,...c->...", a, a, dtype=np.float64))[..., None]
    out: np.ndarray = a / np.maximum(norm, _EPS).astype(np.float32)
    return out.astype(np.float32, copy=False)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer–Lambert optical density per pixel: mean over R, G, B of ``-log10((I + 1) / 256)``.

    ``I`` is the 8-bit intensity; the +1 keeps black finite. White (255) gives 0, black (0) gives
    log10(256) ≈ 2.408. Haematoxylin-rich (nuclear) tissue is dark, so it has the highest OD.
    Accepts (..., 3) uint8 (or (..., 4) RGBA: alpha is ignored); returns float32 of shape (...).
    """
    a = np.asarray(rgb)
    if a.ndim < 1 or a.shape[-1] not in (3, 4):
        raise InputError(f"optical_density expects (..., 3) RGB values, got shape {a.shape}")
    if a.dtype == np.uint8:  # 8 times faster through a table, and equal bit for bit (all 2**24 colours checked)
        total = OD_TABLE[a[..., 0]] + OD_TABLE[a[..., 1]] + OD_TABLE[a[..., 2]]
        return np.asarray(total / np.float32(3), dtype=np.float32)
    return _optical_density(a[..., :3])


def _optical_density(a: np.ndarray) -> np.ndarray:
    od = -np.log10((a.astype(np.float32) + 1.0) / 256.0)
    mean_od: np.ndarray = od.mean(axis=-1)
    return mean_od.astype(np.float32)


OD_TABLE = -np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)  # float32: one channel's OD per value


# ------------------------------------------------------------------------------------------- model


def _json_roundtrip(obj: Any, what: str) -> Any:
    """Normalise to what JSON can hold, so saved and in-memory identities compare equal."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be JSON-serialisable with finite numbers: {exc}") from exc


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    return bool(a == b)


@dataclass
class ClusterModel:
    """A fitted KMeans in canonical order (row i-1 of ``centroids`` is "Cluster i", the i-th darkest)."""

    centroids: np.ndarray
    k: int
    normalisation: str = "l2"
    feature_identity: dict[str, Any] = field(default_factory=dict)
    centroid_od: np.ndarray = field(default_factory=lambda: np.empty(0))
    n_fit_samples: int = 0
    seed: int = 0
    sources: list[str] = field(default_factory=list)
    n_init: int = 0
    inertia: float = 0.0

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or self.centroids.shape[0] != self.k or self.k < 1:
            raise InputError(f"centroids of shape {self.centroids.shape} do not match k={self.k}")
        if not np.all(np.isfinite(self.centroids)):
            raise InputError("centroids contain non-finite values")
        if self.normalisation != "l2":
            raise InputError(f"unsupported normalisation {self.normalisation!r} (only 'l2')")
        if self.centroid_od.size == 0:
            self.centroid_od = np.zeros(self.k, dtype=np.float64)
        self.centroid_od = np.asarray(self.centroid_od, dtype=np.float64).reshape(self.k)
        self.feature_identity = _json_roundtrip(dict(self.feature_identity), "feature_identity")
        self.sources = [str(s) for s in self.sources]

    @property
    def n_features(self) -> int:
        """Number of feature channels C the model expects."""
        return int(self.centroids.shape[1])

    # -- prediction

    def predict(self, features: np.ndarray, chunk: int = 65536, mask: np.ndarray | None = None) -> np.ndarray:
        """Nearest centroid after L2 normalisation: labels 1..K as int32.

        ``features`` is (N, C) or a dense map (h, w, C); the result has shape (N,) or (h, w). With a boolean
        ``mask`` of the leading shape, only masked positions are labelled and the rest are 0 (background).
        Distances are computed in float64 chunk by chunk, so labels do not depend on ``chunk``.
        """
        f = np.asarray(features)
        if f.ndim < 2 or f.shape[-1] != self.n_features:
            raise ModelMismatchError(
                f"features have shape {f.shape} but the model expects {self.n_features} channels"
            )
        lead = f.shape[:-1]
        flat = f.reshape(-1, self.n_features)
        out = np.zeros(flat.shape[0], dtype=np.int32)
        if mask is None:
            idx = None
            n = flat.shape[0]
        else:
            m = np.asarray(mask, dtype=bool)
            if m.shape != lead:
                raise InputError(f"mask shape {m.shape} does not match feature positions {lead}")
            idx = np.flatnonzero(m.ravel())
            n = idx.size
        c = self.centroids.astype(np.float64)
        c_sq = np.einsum("kc,kc->k", c, c)
        c_t = np.ascontiguousarray(c.T)  # matmul with the transposed view is many times slower
        step = max(1, int(chunk))
        with one_blas_thread():
            self._assign(flat, idx, n, step, c_sq, c_t, out)
        return out.reshape(lead)

    @staticmethod
    def _assign(flat: np.ndarray, idx: np.ndarray | None, n: int, step: int, c_sq: np.ndarray, c_t: np.ndarray,
                out: np.ndarray) -> None:
        for start in range(0, n, step):
            sel = slice(start, min(start + step, n))
            rows = flat[sel] if idx is None else flat[idx[sel]]
            x = l2_normalise(rows).astype(np.float64)
            d = c_sq[None, :] - 2.0 * (x @ c_t)  # ||x||² is the same for every centroid
            lab = np.argmin(d, axis=1).astype(np.int32) + 1
            if idx is None:
                out[sel] = lab
            else:
                out[idx[sel]] = lab

    # -- compatibility

    def check_compatible(self, feature_identity: Mapping[str, Any]) -> None:
        """Raise :class:`ModelMismatchError` naming every key whose value differs (or is missing)."""
        other = _json_roundtrip(dict(feature_identity), "feature_identity")
        mine = self.feature_identity
        diffs = []
        for key in sorted(set(mine) | set(other)):
            if key not in mine:
                diffs.append(f"{key}: model has none, features have {other[key]!r}")
            elif key not in other:
                diffs.append(f"{key}: model has {mine[key]!r}, features have none")
            elif not _values_equal(mine[key], other[key]):
                diffs.append(f"{key}: model has {mine[key]!r}, features have {other[key]!r}")
        if diffs:
            raise ModelMismatchError("clustering model does not fit these features (" + "; ".join(diffs) + ")")

    # -- files

    def metadata(self) -> dict[str, Any]:
        """Everything but the arrays, as JSON-ready values (what :meth:`save` writes as ``metadata``)."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "k": int(self.k),
            "n_features": self.n_features,
            "normalisation": self.normalisation,
            "canonical_order": "descending mean optical density of the fitted samples (cluster 1 = darkest)",
            "feature_identity": self.feature_identity,
            "n_fit_samples": int(self.n_fit_samples),
            "seed": int(self.seed),
            "n_init": int(self.n_init),
            "inertia": float(self.inertia),
            "sources": list(self.sources),
        }

    def to_bytes(self) -> bytes:
        """The ``.npz`` file content: deterministic bytes (fixed zip timestamps, sorted JSON)."""
        meta = json.dumps(self.metadata(), sort_keys=True, ensure_ascii=False, allow_nan=False)
        arrays = {
            "centroids": self.centroids,
            "centroid_od": self.centroid_od.astype(np.float64),
            "metadata": np.array(meta),
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                npy = io.BytesIO()
                np.lib.format.write_array(npy, np.asarray(arr, order="C"), allow_pickle=False)
                info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                zf.writestr(info, npy.getvalue())
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model atomically (temporary file in the same folder, then rename). Returns the path."""
        p = Path(path)
        atomic_write_bytes(p, self.to_bytes())
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterModel:
        """Read a model file without ever unpickling: object arrays and pickles are refused."""
        p = Path(path)
        try:
            z = np.load(p, allow_pickle=False)
        except FileNotFoundError as exc:
            raise InputError(f"{p}: clustering model file not found") from exc
        except ValueError as exc:  # numpy refuses pickled content when allow_pickle=False
            raise InputError(f"{p}: refusing to load a model file that contains pickled data ({exc})") from exc
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"{p}: not a readable clustering model file ({exc})") from exc
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise InputError(f"{p}: not a clustering model file (expected an .npz archive)")
        with z:
            missing = {"centroids", "centroid_od", "metadata"} - set(z.files)
            if missing:
                raise InputError(f"{p}: not a clustering model file (missing {', '.join(sorted(missing))})")
            try:
                centroids = z["centroids"]
                centroid_od = z["centroid_od"]
                meta_arr = z["metadata"]
            except ValueError as exc:
                raise InputError(f"{p}: refusing to load a model file that contains pickled data ({exc})") from exc
        if meta_arr.dtype.kind != "U" or meta_arr.shape != ():
            raise InputError(f"{p}: model metadata must be a JSON string")
        try:
            meta = json.loads(str(meta_arr))
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: model metadata is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise InputError(f"{p}: not an {FORMAT_NAME} model file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"{p}: model format version {meta.get('format_version')!r} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        if centroids.dtype.kind != "f" or centroid_od.dtype.kind != "f":
            raise InputError(f"{p}: model arrays must be floating point")
        try:
            return cls(
                centroids=centroids,
                k=int(meta["k"]),
                normalisation=str(meta["normalisation"]),
                feature_identity=dict(meta.get("feature_identity") or {}),
                centroid_od=centroid_od,
                n_fit_samples=int(meta.get("n_fit_samples", 0)),
                seed=int(meta.get("seed", 0)),
                sources=list(meta.get("sources") or []),
                n_init=int(meta.get("n_init", 0)),
                inertia=float(meta.get("inertia", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{p}: malformed clustering model ({exc})") from exc


# --------------------------------------------------------------------------------------------- fitting


def _canonical_order(centroids: np.ndarray, mean_od: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Permutation putting clusters in descending mean OD; ties by centroid values (lexicographic).

    Empty clusters (no fitted sample assigned) go last. OD is rounded to 1e-9 so float noise between
    machines cannot swap two clusters that are really tied; such ties fall back to the centroid values.
    """
    od_key = np.where(counts > 0, -np.round(mean_od, 9), np.inf)
    keys = [centroids[:, j] for j in range(centroids.shape[1] - 1, -1, -1)] + [od_key]
    return np.lexsort(keys)


def _count_distinct(x: np.ndarray, limit: int) -> int:
    """Number of distinct rows of ``x``, counted only up to ``limit`` (k passes, no full sort of N rows)."""
    if x.shape[0] == 0:
        return 0
    found = [x[0]]
    different = np.ones(x.shape[0], dtype=bool)
    while len(found) < limit:
        different &= np.any(x != found[-1], axis=1)
        nxt = np.flatnonzero(different)
        if nxt.size == 0:
            break
        found.append(x[nxt[0]])
    return len(found)


def fit_kmeans(
    features: np.ndarray,
    od: np.ndarray,
    k: int,
    seed: int,
    n_init: int = 10,
    *,
    max_iter: int = 300,
    feature_identity: Mapping[str, Any] | None = None,
    sources: Sequence[str] | None = None,
) -> ClusterModel:
    """Fit KMeans (seeded, k-means++) on L2-normalised rows and return the model in canonical order.

    ``od`` is the optical density of each fitted row (e.g. :func:`optical_density` of the RGB image at
    feature-cell resolution). Cluster 1 is the cluster whose fitted samples have the highest mean OD
    (darkest, haematoxylin-rich), cluster K the lightest; that makes ids mean the same across runs.
    """
    f = np.asarray(features, dtype=np.float32)
    o = np.asarray(od, dtype=np.float64).ravel()
    k = int(k)
    if f.ndim != 2:
        raise InputError(f"features must be (N, C), got shape {f.shape}")
    if o.shape[0] != f.shape[0]:
        raise InputError(f"{f.shape[0]} feature rows but {o.shape[0]} optical-density values")
    if k < 1:
        raise InputError(f"number of clusters must be >= 1, got {k}")
    if not np.all(np.isfinite(f)) or not np.all(np.isfinite(o)):
        raise InputError("features or optical densities contain NaN or infinite values")
    x = l2_normalise(f)
    n_distinct = _count_distinct(x, k)
    if n_distinct < k:
        raise InputError(
            f"cannot fit {k} clusters on {n_distinct} distinct feature vectors ({f.shape[0]} samples): "
            "use fewer clusters or more tissue"
        )
    km = kmeans(x, k, n_init=int(n_init), max_iter=int(max_iter), seed=int(seed))
    raw = np.asarray(km.centers, dtype=np.float32)
    provisional = ClusterModel(centroids=raw, k=k)
    lab = provisional.predict(x) - 1  # same nearest-centroid rule as later predictions
    counts = np.bincount(lab, minlength=k)
    sums = np.bincount(lab, weights=o, minlength=k)
    mean_od = np.divide(sums, counts, out=np.zeros(k), where=counts > 0)
    perm = _canonical_order(raw, mean_od, counts)
    return ClusterModel(
        centroids=raw[perm],
        k=k,
        normalisation="l2",
        feature_identity=dict(feature_identity or {}),
        centroid_od=mean_od[perm],
        n_fit_samples=int(f.shape[0]),
        seed=int(seed),
        sources=list(sources or []),
        n_init=int(n_init),
        inertia=float(km.inertia),
    )


def fit_region(
    feature_map: np.ndarray,
    mask: np.ndarray,
    rgb: np.ndarray,
    k: int,
    n_samples: int,
    seed: int,
    *,
    source: str = "",
    n_init: int = 10,
    feature_identity: Mapping[str, Any] | None = None,
) -> ClusterModel:
    """Intra mode in one call: sample ``n_samples`` tissue cells of one region and fit on them.

    ``feature_map`` (h, w, C), ``mask`` (h, w) bool and ``rgb`` (h, w, 3) uint8 share the feature-cell
    grid. Sampling is seeded from ``seed`` and ``source`` (:func:`source_rng`).
    """
    fm = np.asarray(feature_map)
    m = np.asarray(mask, dtype=bool)
    if fm.ndim != 3 or fm.shape[:2] != m.shape or np.asarray(rgb).shape[:2] != m.shape:
        raise InputError(
            f"feature map {fm.shape}, mask {m.shape} and image {np.asarray(rgb).shape} must share (h, w)"
        )
    idx = sample_positions(m, n_samples, source_rng(seed, source))
    feats = fm.reshape(-1, fm.shape[-1])[idx]
    od = optical_density(rgb).ravel()[idx]
    return fit_kmeans(
        feats, od, k, seed, n_init=n_init, feature_identity=feature_identity,
        sources=[source] if source else [],
    )
