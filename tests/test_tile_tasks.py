"""A distributed run computes a large region's tiles on the workers (tile groups), with the same features, cell
colours and tissue cells as in this process; regions of one tile stay in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from equiseg_wsi.features import build_extractor
from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.options import ExtractorSpec, RegionOptions, SegmentOptions
from equiseg_wsi.regions import open_regions
from equiseg_wsi.segment import region_features
from equiseg_wsi.tile_features import TILES_PER_TASK, TileGroup, plan_tiles, remote_tiles

REPO = Path(__file__).resolve().parents[1]
SVS = REPO / "sample_data" / "CMU-1-Small-Region.svs"
MPP = 4.0


def _features(mapper: object | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    spec = ExtractorSpec(device="cpu", target_mpp=MPP)
    seg = SegmentOptions(target_mpp=MPP, tile_size=128)
    extractor = build_extractor(spec)
    (source,) = collect_inputs([SVS])
    with open_regions(source, RegionOptions()) as (slide, found):
        area = found.areas[0]
        n_tiles = len(plan_tiles(slide, area, extractor, seg).tiles)
        remote = None if mapper is None else remote_tiles(mapper, "auto", None, spec, seg)  # type: ignore[arg-type]
        with region_features(slide, area, extractor, seg, remote=remote) as rf:
            return np.array(rf.features), rf.rgb.copy(), rf.tissue.copy(), n_tiles


def test_tile_groups_on_two_workers_give_the_features_of_this_process() -> None:
    pytest.importorskip("distributed")
    from equiseg_wsi.distributed import DaskExecutor

    local, rgb, tissue, n_tiles = _features(None)
    assert n_tiles >= 2 * TILES_PER_TASK  # several groups: both workers get some
    seen: list[int] = []
    with DaskExecutor(n_workers=2).session() as mapper:
        assert mapper is not None

        def counting(groups: list[TileGroup]) -> object:
            seen.append(len(groups))
            return mapper(groups)

        remote, remote_rgb, remote_tissue, _ = _features(counting)
    assert seen == [-(-n_tiles // TILES_PER_TASK)]
    assert np.array_equal(remote, local) and np.array_equal(remote_rgb, rgb) and np.array_equal(remote_tissue, tissue)


def test_a_one_tile_region_is_not_sent_to_the_workers() -> None:
    calls: list[int] = []

    def refuse(groups: list[TileGroup]) -> object:
        calls.append(len(groups))
        raise AssertionError("a one-tile region went to the workers")

    spec = ExtractorSpec(device="cpu", target_mpp=MPP)
    seg = SegmentOptions(target_mpp=MPP, tile_size=512)  # the whole sample region is one tile at 4 µm/px
    extractor = build_extractor(spec)
    (source,) = collect_inputs([SVS])
    with open_regions(source, RegionOptions()) as (slide, found):
        area = found.areas[0]
        assert len(plan_tiles(slide, area, extractor, seg).tiles) == 1
        with region_features(slide, area, extractor, seg, remote=remote_tiles(refuse, "auto", None, spec, seg)) as rf:
            assert rf.tissue.any()
    assert calls == []
