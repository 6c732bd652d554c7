"""What a run-wide fit found on each slide (tissue, TMA grid, regions, the glass colour warning) is kept in the
run's feature cache, so the segmentation after it does not find the tissue (or dearray a TMA) again; a changed
input or damaged entry is found afresh, and the cache is gone after the run. (The DICOM slide's colour warning
reaching the manifest through the cache is `test_dicom_glass`'s run test.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import CallLog, copy_sample_cores

import equiseg_wsi.regions as regions
from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions
from equiseg_wsi.run_model import FEATURE_CACHE
from equiseg_wsi.runner import InProcess, run_folder

REPO = Path(__file__).resolve().parents[1]


def _job(clustering: str) -> RunJob:
    seg = SegmentOptions(target_mpp=4.0, tile_size=128)
    return RunJob(ExtractorSpec(device="cpu", target_mpp=4.0), RunOptions(seg, RegionOptions(mpp=0.5),
                                                                          clustering=clustering))


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CallLog:
    calls = CallLog(tmp_path / "tissue-calls.txt")  # the run's workers are forked processes
    real = regions.detect_tissue

    def counting(slide: object, *args: object, **kwargs: object) -> object:
        calls.append(str(getattr(slide, "path", "")))
        return real(slide, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(regions, "detect_tissue", counting)
    return calls


@pytest.mark.parametrize("clustering", ["run", "slide"])
def test_each_slide_is_searched_for_tissue_once(tmp_path: Path, counted: CallLog, clustering: str) -> None:
    folder = copy_sample_cores(tmp_path / "in", 2)
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", folder)  # dearrayed once too
    sources = collect_inputs([folder])
    report = run_folder(sources, tmp_path / "out", _job(clustering), executor=InProcess(1))
    assert [r.status for r in report.results] == ["done"] * len(sources)
    assert sorted(counted.items()) == sorted(str(s.path) for s in sources)
    assert not (tmp_path / "out" / FEATURE_CACHE).exists()


def test_a_damaged_or_stale_entry_is_found_afresh(tmp_path: Path, counted: CallLog) -> None:
    folder = copy_sample_cores(tmp_path / "in", 1)
    (source,) = collect_inputs([folder])
    cache = tmp_path / "cache"
    with regions.open_regions(source, RegionOptions(mpp=0.5), cache) as (_, first):
        pass
    (entry,) = cache.glob("regions-*.pickle.z")
    with regions.open_regions(source, RegionOptions(mpp=0.5), cache) as (_, again):
        assert [a.name for a in again.areas] == [a.name for a in first.areas]
    assert len(counted.items()) == 1
    entry.write_bytes(b"not a pickle")
    with regions.open_regions(source, RegionOptions(mpp=0.5), cache) as (_, repaired):
        assert [a.rect_level0 for a in repaired.areas] == [a.rect_level0 for a in first.areas]
    assert len(counted.items()) == 2
    with regions.open_regions(source, RegionOptions(mpp=0.5, tissue_mpp=16.0), cache):  # other options: another entry
        pass
    assert len(counted.items()) == 3 and len(list(cache.glob("regions-*.pickle.z"))) == 2
    stat = source.path.stat()
    os.utime(source.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed input (modification time)
    with regions.open_regions(source, RegionOptions(mpp=0.5), cache):
        pass
    assert len(counted.items()) == 4
