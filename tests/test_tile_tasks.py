"""A distributed run computes a large region's tiles on the workers (tile groups), with the same features, cell
colours and tissue cells as in this process; regions of one tile go to the workers too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from equiseg_wsi.features import build_extractor
from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.options import ExtractorSpec, RegionOptions, SegmentOptions
from equiseg_wsi.regions import open_regions
from equiseg_wsi.segment import region_features
from equiseg_wsi.tile_features import TILES_PER_TASK, TileGroup, group_features, plan_tiles, remote_tiles

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


def test_a_one_tile_region_goes_to_the_workers_too() -> None:
    """A cohort of one-tile cores must not be computed here while the workers wait (before: it was)."""
    calls: list[int] = []

    def in_this_process(groups: list[TileGroup]) -> object:
        calls.append(len(groups))
        return [group_features(g) for g in groups]

    spec = ExtractorSpec(device="cpu", target_mpp=MPP)
    seg = SegmentOptions(target_mpp=MPP, tile_size=512)  # the whole sample region is one tile at 4 µm/px
    extractor = build_extractor(spec)
    (source,) = collect_inputs([SVS])
    with open_regions(source, RegionOptions()) as (slide, found):
        area = found.areas[0]
        assert len(plan_tiles(slide, area, extractor, seg).tiles) == 1
        with region_features(slide, area, extractor, seg) as local:
            expected = np.array(local.features)
        with region_features(slide, area, extractor, seg,
                             remote=remote_tiles(in_this_process, "auto", None, spec, seg)) as rf:
            assert np.array_equal(np.asarray(rf.features), expected) and rf.tissue.any()
    assert calls == [1]
