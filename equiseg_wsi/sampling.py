"""Seeded samples of feature rows for fitting: per-region positions and streaming per-source reservoirs.

Every sample is seeded from the run seed and the source *name*, never from the order in which sources
arrive, so a core's sample is the same whichever other cores are in the run.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import InputError

__all__ = ["CohortSampler", "ReservoirSampler", "sample_positions", "source_rng"]


def source_rng(seed: int, source: str) -> np.random.Generator:
    """A generator for one core/region derived from the run seed and the source *name*.

    Why: a core's sample then does not depend on which other cores are in the run or their order.
    """
    digest = hashlib.sha256(str(source).encode("utf-8")).digest()
    key = int.from_bytes(digest[:8], "little")
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(key,)))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(int(rng))


def sample_positions(mask: np.ndarray, n: int, rng: np.random.Generator | int) -> np.ndarray:
    """Seeded sample of ``n`` tissue positions (without replacement; all of them if fewer).

    Returns sorted flat (row-major) indices into ``mask`` as int64, so
    ``features.reshape(-1, C)[idx]`` are the sampled vectors. Sorting keeps downstream order stable.
    """
    m = np.asarray(mask, dtype=bool)
    if n < 0:
        raise InputError(f"number of samples must be >= 0, got {n}")
    idx = np.flatnonzero(m.ravel())
    if idx.size <= n:
        return idx.astype(np.int64)
    chosen = _as_rng(rng).choice(idx.size, size=int(n), replace=False)
    return np.sort(idx[chosen]).astype(np.int64)


class ReservoirSampler:
    """Fixed-size uniform sample of feature rows fed in chunks, for sets larger than memory.

    Each row gets an independent uniform key from a seeded generator; the sampler keeps the ``n`` rows
    with the smallest keys, which is a uniform sample without replacement. The same chunks in the same
    order give the same sample (and so does the same row stream cut into different chunk sizes, since
    the keys are drawn in stream order). Memory is O(n·C + chunk).
    """

    def __init__(self, n: int, seed: int | np.random.Generator) -> None:
        if n < 0:
            raise InputError(f"reservoir size must be >= 0, got {n}")
        self.n = int(n)
        self._rng = _as_rng(seed)
        self._feat: np.ndarray | None = None
        self._od = np.empty(0, dtype=np.float32)
        self._keys = np.empty(0, dtype=np.float64)
        self._order = np.empty(0, dtype=np.int64)
        self.n_seen = 0

    def feed(self, features: np.ndarray, od: np.ndarray) -> None:
        """Offer a chunk of rows (m, C) with their optical density (m,)."""
        f = np.asarray(features, dtype=np.float32)
        o = np.asarray(od, dtype=np.float32).ravel()
        if f.ndim != 2:
            raise InputError(f"features must be (N, C), got shape {f.shape}")
        if o.shape[0] != f.shape[0]:
            raise InputError(f"{f.shape[0]} feature rows but {o.shape[0]} optical-density values")
        if self._feat is not None and f.shape[1] != self._feat.shape[1]:
            raise InputError(f"feature width changed from {self._feat.shape[1]} to {f.shape[1]} channels")
        m = int(f.shape[0])
        keys = self._rng.random(m)
        order = np.arange(self.n_seen, self.n_seen + m, dtype=np.int64)
        self.n_seen += m
        if self._feat is None:
            self._feat = np.empty((0, f.shape[1]), dtype=np.float32)
        if self.n == 0 or m == 0:
            return
        if self._keys.size >= self.n:  # full: only rows beating the current worst key can enter
            keep = keys < self._keys.max()
            f, o, keys, order = f[keep], o[keep], keys[keep], order[keep]
            if keys.size == 0:
                return
        all_keys = np.concatenate([self._keys, keys])
        all_order = np.concatenate([self._order, order])
        best = np.lexsort((all_order, all_keys))[: self.n]  # ties (never in practice) by arrival
        all_feat = np.concatenate([self._feat, f])
        all_od = np.concatenate([self._od, o])
        self._keys, self._order = all_keys[best], all_order[best]
        self._feat, self._od = all_feat[best], all_od[best]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The sample as (features (n, C) float32, od (n,) float32), in stream (arrival) order."""
        if self._feat is None:
            return np.empty((0, 0), dtype=np.float32), np.empty(0, dtype=np.float32)
        s = np.argsort(self._order, kind="stable")
        return self._feat[s].copy(), self._od[s].copy()

    def __len__(self) -> int:
        return int(self._keys.size)


class CohortSampler:
    """``n_per_source`` rows from EVERY core/region of a fitting set (the paper: 2000 per core).

    One :class:`ReservoirSampler` per source, seeded from the run seed and the source name
    (:func:`source_rng`), so each core contributes equally and its sample does not depend on the others.
    """

    def __init__(self, n_per_source: int, seed: int) -> None:
        self.n_per_source = int(n_per_source)
        self.seed = int(seed)
        self._samplers: dict[str, ReservoirSampler] = {}

    def feed(self, source: str, features: np.ndarray, od: np.ndarray) -> None:
        """Offer a chunk of rows from ``source`` (chunks of one source may be interleaved with others)."""
        s = self._samplers.get(source)
        if s is None:
            s = self._samplers[source] = ReservoirSampler(self.n_per_source, source_rng(self.seed, source))
        s.feed(features, od)

    @property
    def sources(self) -> list[str]:
        """Source names in the order they were first fed."""
        return list(self._samplers)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features (N, C), od (N,), source index (N,) into :attr:`sources`), sources concatenated in order."""
        feats, ods, src = [], [], []
        for i, s in enumerate(self._samplers.values()):
            f, o = s.result()
            if f.shape[0]:
                feats.append(f)
                ods.append(o)
                src.append(np.full(f.shape[0], i, dtype=np.int64))
        if not feats:
            raise InputError("no feature rows were sampled: no tissue positions in any source")
        return np.concatenate(feats), np.concatenate(ods), np.concatenate(src)
