"""Slide reading: metadata through both backends, reads at a target µm/px, and clear errors on bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi.errors import MppUnknownError, SlideError
from equiseg_wsi.slide import Slide, open_slide

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

BACKENDS = ["tiffslide", "openslide"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_svs_metadata(sample_svs: Path, backend: str) -> None:
    with open_slide(sample_svs, backend=backend) as slide:
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "metadata"
        assert slide.vendor == "aperio"
        assert slide.backend == backend
        assert slide.bounds_offset == (0, 0)
        assert "label" in slide.associated_images


@pytest.mark.parametrize("backend", BACKENDS)
def test_pyramid_levels_and_downsamples(pyramid_svs: Path, backend: str) -> None:
    with open_slide(pyramid_svs, backend=backend) as slide:
        assert [round(lv.downsample, 2) for lv in slide.levels] == [1.0, 2.0, 4.0]
        assert slide.best_level(4.2) == 2 and slide.best_level(3.9) == 1 and slide.best_level(0.5) == 0


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")
@pytest.mark.parametrize("backend", BACKENDS)
def test_info_json_on_shared_slides(backend: str) -> None:
    files = sorted(SHARED_DATA.glob("*.svs"))
    result = CliRunner().invoke(cli, ["info", "--json", "--backend", backend, *map(str, files)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert (row["width"], row["height"]) == (2220, 2967)
        assert row["mpp_x"] == pytest.approx(0.499) and row["mpp_y"] == pytest.approx(0.499)
        assert row["backend"] == backend and row["bounds_offset"] == [0, 0]
    pyramid = next(r for r in rows if "pyramid3" in r["path"])
    assert [lv["downsample"] for lv in pyramid["levels"]] == pytest.approx([1, 2, 4], abs=0.01)


def test_read_region_backends_agree(pyramid_svs: Path) -> None:
    reads = []
    for backend in BACKENDS:
        with open_slide(pyramid_svs, backend=backend) as slide:
            reads.append(slide.read_region(100.5, 200.25, 180, 240, mpp=2.0).astype(np.float64))
    assert reads[0].shape == (240, 180, 3)
    assert np.abs(reads[0] - reads[1]).mean() < 2.0


def test_read_region_is_one_grid(sample_svs: Path) -> None:
    """A region read at an offset equals the crop of a larger read: tiles form one exact grid."""
    with open_slide(sample_svs) as slide:
        s = 2.0 / slide.mpp
        whole = slide.read_region(0, 0, 300, 400, mpp=2.0)
        part = slide.read_region(25 * s, 50 * s, 120, 160, mpp=2.0)
    np.testing.assert_array_equal(part, whole[50:210, 25:145])


def test_read_region_size_and_antialiasing(sample_svs: Path, sample_rgb: np.ndarray) -> None:
    with open_slide(sample_svs) as slide:
        full = slide.read_full(mpp=0.499 * 4)
    assert full.shape == (round(2967 / 4), round(2220 / 4), 3)
    # Area averaging: equal to the 4x4 block mean of level 0 (to rounding).
    block = sample_rgb[:2964, :2220].reshape(741, 4, 555, 4, 3).mean(axis=(1, 3))
    assert np.abs(full[:741, :555].astype(np.float64) - block).max() <= 1.0


def test_outside_the_image_reads_white(sample_svs: Path) -> None:
    with open_slide(sample_svs) as slide:
        region = slide.read_region(-200, -200, 50, 50, mpp=2.0)
    assert (region[:20, :20] == 255).all()


def test_plain_jpeg_core_needs_mpp(tmp_path: Path, sample_rgb: np.ndarray) -> None:
    path = tmp_path / "slide001_core001.jpg"
    Image.fromarray(sample_rgb[:800, :600]).save(path, quality=92)
    with open_slide(path) as slide:
        assert slide.backend == "image" and (slide.width, slide.height) == (600, 800)
        with pytest.raises(MppUnknownError, match="--mpp"):
            _ = slide.mpp
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user"
        assert [lv.downsample for lv in slide.levels] == pytest.approx([1, 2, 4, 8], rel=0.01)
        coarse = slide.read_full(mpp=2.0)  # served by the 1/8 DCT-scaled decode
        assert coarse.shape == (100, 75, 3)
        exact = np.asarray(Image.fromarray(slide.read_full(mpp=0.25)).reduce(8)).astype(np.float64)
        assert np.abs(coarse.astype(np.float64) - exact).mean() < 3.0


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:32, :, 3] = 255  # top half opaque red, bottom half transparent
    path = tmp_path / "core.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with open_slide(path, mpp=0.5) as slide:
        rgb = slide.read_full(mpp=0.5)
    assert tuple(rgb[0, 0]) == (200, 0, 0) and tuple(rgb[-1, -1]) == (255, 255, 255)


def test_metadata_mpp_wins_and_placeholder_dpi_is_unknown(tmp_path: Path, sample_rgb: np.ndarray) -> None:
    path = tmp_path / "tile.png"
    Image.fromarray(sample_rgb[:64, :64]).save(path, dpi=(72, 72))  # 352.8 µm/px: an editor default
    with open_slide(path) as slide:
        assert slide.mpp_x is None
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def _bad_files(tmp: Path, sample_svs: Path) -> dict[str, Path]:
    zero = tmp / "zero.svs"
    zero.write_bytes(b"")
    text = tmp / "notes.svs"
    text.write_text("this is not a slide\n")
    truncated = tmp / "truncated.svs"
    truncated.write_bytes(sample_svs.read_bytes()[:1_000_000])
    folder = tmp / "folder.svs"
    folder.mkdir()
    return {"zero": zero, "text": text, "truncated": truncated, "folder": folder, "missing": tmp / "missing.svs"}


@pytest.mark.parametrize("kind", ["zero", "text", "truncated", "folder", "missing"])
def test_bad_input_raises_slide_error(tmp_path: Path, sample_svs: Path, kind: str) -> None:
    path = _bad_files(tmp_path, sample_svs)[kind]
    with pytest.raises(SlideError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_truncated_tiles_are_detected(tmp_path: Path, pyramid_svs: Path) -> None:
    """tifffile writes the header first: a cut-off copy opens, so the missing tile data must be caught."""
    data = pyramid_svs.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="truncated"):
        open_slide(cut)


def test_info_cli_reports_bad_files_in_one_line_each(tmp_path: Path, sample_svs: Path) -> None:
    bad = _bad_files(tmp_path, sample_svs)
    good = tmp_path / "good.svs"
    shutil.copy(sample_svs, good)
    args = ["info", "--json", str(bad["zero"]), str(good), str(bad["text"]), str(bad["truncated"]),
            str(bad["folder"]), str(bad["missing"])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    stdout_rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in stdout_rows] == ["good.svs"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 5
    for name in ("zero.svs", "notes.svs", "truncated.svs", "folder.svs", "missing.svs"):
        assert sum(name in line for line in errors) == 1


def test_cli_version_and_help() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["--version"]).output.startswith("equiseg, version")
    help_text = runner.invoke(cli, ["info", "--help"]).output
    assert "µm/px" in help_text and "--backend" in help_text


def test_array_slide_reads_like_a_file(sample_svs: Path, sample_rgb: np.ndarray) -> None:
    crop = np.ascontiguousarray(sample_rgb[:800, :640])
    memory = Slide.from_array(crop, mpp=0.499, name="crop")
    assert (memory.width, memory.height, memory.mpp, memory.backend) == (640, 800, 0.499, "array")
    with open_slide(sample_svs) as slide:
        np.testing.assert_array_equal(memory.read_region(10.5, 20, 100, 120, 2.0),
                                      slide.read_region(10.5, 20, 100, 120, 2.0))
