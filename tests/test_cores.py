"""Core names, folder listing, masking and the per-core preprocess step."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from equiseg_wsi.cores import (
    find_images,
    masked_core,
    parse_core_name,
    preprocess_core,
    upsample_mask,
)
from equiseg_wsi.errors import InputError, MppUnknownError, SlideError
from equiseg_wsi.inputs import mpp_by_file

CORES = Path(__file__).resolve().parents[1] / "sample_data" / "cores"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("slide001_core003.jpg", ("slide001", "core003")),
        ("/data/SLIDE12_core7.JPG", ("SLIDE12", "core7")),
        ("patient-4.tiff", ("patient-4", "")),
        ("case.core.svs", ("case.core", "")),
        ("slide001_core003_extra.png", ("slide001_core003_extra", "")),
    ],
)
def test_parse_core_name(name: str, expected: tuple[str, str]) -> None:
    assert parse_core_name(name) == expected


def test_find_images_sorted_and_filtered(tmp_path: Path) -> None:
    for name in ("b.svs", "a.JPG", "c.png", "notes.txt", "manifest.csv", ".hidden.jpg", "d.mrxs"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.tif").mkdir()
    assert [p.name for p in find_images(tmp_path)] == ["a.JPG", "b.svs", "c.png", "d.mrxs"]
    with pytest.raises(InputError):
        find_images(tmp_path / "missing")


def test_masked_core_and_upsample() -> None:
    rgb = np.full((4, 6, 3), 100, np.uint8)
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    out = masked_core(rgb, mask)
    assert (out[mask] == 100).all() and (out[~mask] == 255).all() and (rgb == 100).all()
    with pytest.raises(ValueError):
        masked_core(rgb, mask[:3])
    small = np.array([[True, False], [False, True]])
    big = upsample_mask(small, 2.5, 5, 5)
    assert big.shape == (5, 5)
    assert big[:2, :2].all() and not big[:2, 3:].any() and big[3:, 3:].all()


def test_manifest(tmp_path: Path) -> None:
    assert mpp_by_file(CORES / "manifest.csv") == {
        f"slide00{s}_core00{c}.jpg": 0.499 for s in (1, 2) for c in (1, 2)
    }
    bad = tmp_path / "m.csv"
    bad.write_text("path,mpp\na.jpg,zero\n")
    with pytest.raises(InputError, match="line 2"):
        mpp_by_file(bad)


def test_preprocess_core(tmp_path: Path) -> None:
    row = preprocess_core(CORES / "slide002_core002.jpg", tmp_path, mpp=0.499)
    assert (row["slide"], row["core"], row["mpp"]) == ("slide002", "core002", 0.499)
    masked = np.asarray(Image.open(row["processed"]))
    mask = np.asarray(Image.open(row["mask_path"]))
    src = np.asarray(Image.open(CORES / "slide002_core002.jpg"))
    assert masked.shape == src.shape and mask.shape == src.shape[:2]
    assert set(np.unique(mask)) <= {0, 255}
    assert row["tissue_fraction"] == pytest.approx((mask == 255).mean(), abs=1e-6)
    # Background white; JPEG rings a little along the mask edge only.
    assert (masked[mask == 0].min(axis=1) >= 250).mean() > 0.99
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    png = preprocess_core(CORES / "slide002_core002.jpg", tmp_path, mpp=0.499, image_format="png")
    assert png["processed"].endswith("_masked.png")
    assert (np.asarray(Image.open(png["processed"]))[mask == 0] == 255).all()


def test_preprocess_core_errors(tmp_path: Path) -> None:
    with pytest.raises(MppUnknownError):
        preprocess_core(CORES / "slide001_core001.jpg", tmp_path)
    bad = tmp_path / "slide009_core001.jpg"
    bad.write_text("not an image")
    with pytest.raises(SlideError):
        preprocess_core(bad, tmp_path / "out", mpp=0.5)
    copy = tmp_path / "case 7.jpg"
    shutil.copyfile(CORES / "slide002_core002.jpg", copy)
    row = preprocess_core(copy, tmp_path / "out", mpp=0.499)
    assert (row["slide"], row["core"]) == ("case 7", "")
    assert Path(row["processed"]).name == "case 7_masked.jpg"
