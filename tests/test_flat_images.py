"""Blank, black or flat images have no tissue structure: `equiseg run` still segments them but says so (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--target-mpp", "4", "--tile-size", "128", "-q"]


def _run(image: Path, out: Path, mpp: float, *extra: str, exit_code: int = 0) -> tuple[str, dict[str, Any]]:
    """(everything the CLI printed, the slide's manifest entry) of one run."""
    result = CliRunner().invoke(cli, ["run", str(image), "-o", str(out), "--mpp", str(mpp), *FAST, *extra])
    assert result.exit_code == exit_code, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    [slide] = manifest["slides"]
    return result.output, slide


def _flat(kind: str) -> np.ndarray:
    if kind == "black":
        return np.zeros((512, 512, 3), dtype=np.uint8)
    colour = np.array([220, 150, 190]) if kind == "pink-noise" else np.array([128, 128, 128])
    # pixel noise strong enough to survive the exact 8x block mean down to 4 µm/px (sd 1 after it), so the network
    # sees varied pixels while the 32-µm cells' mean colours are flat (sd 1/8)
    noise = np.random.default_rng(0).normal(0.0, 8.0, (512, 512, 3))
    return np.clip(np.round(colour + noise), 0, 255).astype(np.uint8)


# --glass keep: the network sees white glass beyond the image edge, so a black image splits into edge ring vs
# interior and segments "fine"; grey with noise is dense enough (OD 0.3) to count as 100 % tissue. Flat pink
# at 2.5 µm/px: the last row and column of cells overhang the image edge and average in white padding.
@pytest.mark.parametrize(("kind", "extra"), [("black", ["--glass", "keep"]), ("grey-noise", []),
                                             ("pink-noise", ["--target-mpp", "2.5"])])
def test_flat_image_warns_no_structure(kind: str, extra: list[str], tmp_path: Path) -> None:
    image = tmp_path / f"{kind}.png"
    Image.fromarray(_flat(kind)).save(image)
    output, slide = _run(image, tmp_path / "out", 0.5, *extra)
    assert "Warning:" in output and "no structure" in output
    assert slide["status"] == "done"
    assert any("no structure" in w and "blank or black" in w for w in slide["warnings"]), slide["warnings"]


def test_black_image_that_cannot_be_clustered_says_why(tmp_path: Path) -> None:
    """With the default glass fill every cell of a black image has the same features: KMeans cannot fit, and
    the failure names the cause."""
    image = tmp_path / "black.png"
    Image.fromarray(_flat("black")).save(image)
    output, slide = _run(image, tmp_path / "out", 0.5, exit_code=1)
    assert "no structure" in output
    assert slide["status"] == "failed" and "no structure" in slide["error"]


def test_real_core_has_structure(tmp_path: Path) -> None:
    image = tmp_path / "slide001_core001.jpg"
    shutil.copy(REPO / "sample_data" / "cores" / "slide001_core001.jpg", image)
    output, slide = _run(image, tmp_path / "out", 0.499)
    assert slide["status"] == "done"
    assert "no structure" not in output
    assert not any("no structure" in w for w in slide["warnings"]), slide["warnings"]
