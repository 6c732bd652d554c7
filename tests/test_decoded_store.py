"""A large core image is decoded once per level in a run (the fit, the segmentation and the report's thumbnail
read what the first decode kept); the outputs are those of a run that decodes every time; a changed file or
a damaged entry is decoded afresh, and nothing is kept after the run."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_CORES
from PIL import Image

import equiseg_wsi.decoded_store as decoded_store
import equiseg_wsi.slide_readers as slide_readers
from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions
from equiseg_wsi.run_model import FEATURE_CACHE
from equiseg_wsi.runner import InProcess, run_folder


@pytest.fixture(scope="module")
def large_core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real core JPEG enlarged to 2,092 px (4.4 Mpx, above `STORE_MIN_PX`)."""
    folder = tmp_path_factory.mktemp("large")
    with Image.open(SAMPLE_CORES / "slide001_core001.jpg") as im:
        im.convert("RGB").resize((2092, 2092), Image.Resampling.BILINEAR).save(folder / "core.jpg", quality=90)
    assert 2092 * 2092 >= decoded_store.STORE_MIN_PX
    return folder


@pytest.fixture()
def decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[int, int]]:
    """How often the image reader really decoded, per decoded size."""
    seen: Counter[tuple[int, int]] = Counter()
    real = slide_readers._pil_to_rgb

    def counting(img: Image.Image) -> np.ndarray:
        seen[img.size] += 1
        return real(img)

    monkeypatch.setattr(slide_readers, "_pil_to_rgb", counting)
    return seen


def _run(folder: Path, out: Path) -> dict[str, bytes]:
    seg = SegmentOptions(target_mpp=2.0, tile_size=128)
    job = RunJob(ExtractorSpec(device="cpu", target_mpp=2.0), RunOptions(seg, RegionOptions(mpp=0.25)))
    report = run_folder(collect_inputs([folder]), out, job, executor=InProcess(1))
    assert [r.status for r in report.results] == ["done"]
    assert not (out / FEATURE_CACHE).exists()
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix in (".geojson", ".csv", ".png", ".npz")}


def test_a_large_core_is_decoded_once_per_level(large_core: Path, tmp_path: Path,
                                                decodes: Counter[tuple[int, int]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _run(large_core, tmp_path / "kept")
    assert decodes and set(decodes.values()) == {1}, decodes
    decodes.clear()
    monkeypatch.setattr(decoded_store, "STORE_MIN_PX", 10**12)  # nothing kept: every reader decodes
    again = _run(large_core, tmp_path / "again")
    assert max(decodes.values()) > 1, decodes
    assert kept.keys() == again.keys() and len(kept) >= 4
    assert all(kept[name] == again[name] for name in kept), [n for n in kept if kept[n] != again[n]]


def _read(path: Path, level: int) -> np.ndarray:
    reader = slide_readers._ImageReader(path)
    return np.array(reader.read(level, 0, 0, reader.levels[level].width, reader.levels[level].height))


def test_a_changed_file_or_damaged_entry_is_decoded_afresh(large_core: Path, tmp_path: Path,
                                                           decodes: Counter[tuple[int, int]]) -> None:
    path = tmp_path / "core.jpg"
    path.write_bytes((large_core / "core.jpg").read_bytes())
    store = tmp_path / "store"
    with decoded_store.keep_decoded(store):
        first = _read(path, 2)
        assert np.array_equal(_read(path, 2), first) and sum(decodes.values()) == 1
        (entry,) = store.glob("decoded-*.npy")
        entry.write_bytes(b"damaged")
        assert np.array_equal(_read(path, 2), first) and sum(decodes.values()) == 2
        with Image.open(large_core / "core.jpg") as im:
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=90)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        flipped = _read(path, 2)
        assert sum(decodes.values()) == 3 and not np.array_equal(flipped, first)
        assert np.abs(flipped[:, ::-1].astype(int) - first).mean() < 3  # the flipped image, not the kept one
    _read(path, 2)
    assert sum(decodes.values()) == 4  # outside the block nothing is kept or read
