"""Issue 17, build 7: a DICOM WSI folder or series is one slide; a slide whose glass is far from neutral after
reading gets a warning that names the likely cause."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi.errors import SlideError
from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.slide import glass_colour, glass_colour_warning, open_slide
from equiseg_wsi.testing.slide_writer import write_aperio_pyramid

REPO = Path(__file__).resolve().parents[1]
DICOM = REPO.parent / "shared" / "data" / "dicom_cmu1"
needs_dicom = pytest.mark.skipif(not (DICOM / "level-0-frames-0-30.dcm").is_file(),
                                 reason="../shared/data/dicom_cmu1 (DICOM WSI test data) is not available")
FAST = ["--device", "cpu", "--target-mpp", "4", "--tile-size", "128"]


def _as_ycbcr_labelled_rgb(rgb: np.ndarray) -> np.ndarray:
    """What a reader returns when YCbCr JPEG data is labelled RGB: the Y, Cb, Cr bytes as R, G, B."""
    return np.asarray(Image.fromarray(rgb).convert("YCbCr"))


@needs_dicom
def test_a_dicom_folder_or_its_files_are_one_slide() -> None:
    sources = collect_inputs([DICOM])
    assert [(s.name, s.slide, s.is_core) for s in sources] == [("dicom_cmu1", "dicom_cmu1", False)]
    files = sorted(DICOM.glob("*.dcm"))
    assert len(files) == 12
    assert [s.name for s in collect_inputs(files)] == ["dicom_cmu1"]  # the series named file by file
    with open_slide(DICOM) as slide:  # the folder opens as its series
        assert (slide.backend, slide.width, slide.height, len(slide.levels)) == ("openslide", 2220, 2967, 12)


@needs_dicom
def test_run_on_the_dicom_folder_makes_one_slide_and_warns_about_its_colours(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "equiseg_cli.main", "run", str(DICOM), "-o", str(out), *FAST, "-q"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    slides = json.loads((out / "manifest.json").read_text())["slides"]
    assert [(s["name"], s["status"]) for s in slides] == [("dicom_cmu1", "done")]
    assert (out / "dicom_cmu1" / "dicom_cmu1.geojson").is_file()
    warning = [line for line in proc.stderr.splitlines() if "far from neutral" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning: ") and "YCbCr" in warning[0], proc.stderr


def test_glass_warning_names_ycbcr_stored_as_rgb(sample_rgb: np.ndarray) -> None:
    rgb = np.ascontiguousarray(sample_rgb[::4, ::4])
    assert glass_colour(rgb) is not None
    assert glass_colour_warning(rgb, "x.svs") is None  # the real scan: neutral glass
    message = glass_colour_warning(_as_ycbcr_labelled_rgb(rgb), "x.svs")
    assert message is not None and message.startswith("x.svs: the glass reads as RGB (")
    assert "YCbCr pixel data labelled RGB" in message
    tinted = rgb.copy()
    tinted[..., 0] = (tinted[..., 0] * 0.7).astype(np.uint8)  # glass (168, 245, 245): not a YCbCr mix-up
    message = glass_colour_warning(tinted, "y.svs")
    assert message is not None and "colour space" in message and "YCbCr pixel data" not in message


def test_no_glass_no_verdict(sample_rgb: np.ndarray) -> None:
    tissue = np.ascontiguousarray(sample_rgb[1200:1500, 900:1200])  # tissue to the edges, no flat bright area
    crop = _as_ycbcr_labelled_rgb(tissue)
    if glass_colour(crop) is not None:
        pytest.skip("this crop happens to hold glass")
    assert glass_colour_warning(crop, "z") is None


def test_a_slide_read_with_ycbcr_colours_warns_once(tmp_path: Path, sample_rgb: np.ndarray,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "wrong_colours.svs"
    write_aperio_pyramid(path, _as_ycbcr_labelled_rgb(np.ascontiguousarray(sample_rgb[:1024, :1024])), mpp=0.5,
                         n_levels=2)
    with caplog.at_level(logging.INFO, logger="equiseg_wsi.slide"), open_slide(path) as slide:
        slide.read_full(8.0)
        slide.read_full(4.0)
        assert len(slide.warnings) == 1 and "YCbCr" in slide.warnings[0] and str(path) in slide.warnings[0]
        assert slide.check_glass() == slide.warnings
    # logged once at info level; the callers print it once (a run: in the slide's warnings, see the run test)
    assert [r.getMessage() for r in caplog.records if "far from neutral" in r.getMessage()] == slide.warnings
    res = CliRunner().invoke(cli, ["info", str(path)])  # info checks a thumbnail and prints one warning line
    lines = [line for line in res.output.splitlines() if "far from neutral" in line]
    assert res.exit_code == 0 and len(lines) == 1 and lines[0].startswith("Warning: ") and "YCbCr" in lines[0]


def test_plain_images_and_neutral_slides_are_not_flagged(tmp_path: Path, sample_svs: Path,
                                                         sample_rgb: np.ndarray) -> None:
    with open_slide(sample_svs) as slide:
        assert slide.check_glass() == []
    png = tmp_path / "camera_tint.png"  # plain images: Pillow decodes their colour space; tints are the camera's
    Image.fromarray(_as_ycbcr_labelled_rgb(np.ascontiguousarray(sample_rgb[:512, :512]))).save(png)
    with open_slide(png, mpp=0.5) as slide:
        slide.read_full(2.0)
        assert slide.warnings == []


def test_a_dcm_file_openslide_cannot_read_is_listed_and_fails_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "report.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    sources = collect_inputs([folder])
    assert [s.name for s in sources] == ["study"]  # listed, not silently dropped
    with pytest.raises(SlideError, match="report.dcm"):
        open_slide(sources[0].path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="is a folder"):
        open_slide(empty)
