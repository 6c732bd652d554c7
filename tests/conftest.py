"""Shared fixtures: paths to the real images the repository ships, and small slides built per test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SVS = REPO / "sample_data" / "CMU-1-Small-Region.svs"
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_CORES = REPO / "sample_data" / "cores"


def copy_sample_cores(folder: Path, n: int, name: str = "c{i}.jpg") -> Path:
    """`n` copies of the four sample core JPEGs (cycled) in `folder`, named by `name`: inputs for runs that need
    several slides (kill, signal, lock tests)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copy(SAMPLE_CORES / f"slide00{1 + i % 2}_core00{1 + (i // 2) % 2}.jpg", folder / name.format(i=i))
    return folder


class CallLog:
    """Calls recorded in a file, one line each, so that calls made in forked worker processes count too."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, item: object) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:  # one short append: whole lines, whichever process
            fh.write(f"{item}\n")

    def items(self) -> list[str]:
        return self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def sample_svs() -> Path:
    """The CC0 OpenSlide test region (2220 x 2967 px, 0.499 µm/px, one level)."""
    return SAMPLE_SVS


@pytest.fixture(scope="session")
def sample_rgb(sample_svs: Path) -> np.ndarray:
    from equiseg_wsi.slide import open_slide

    with open_slide(sample_svs) as slide:
        return slide.read_level(0, 0, 0, slide.width, slide.height)


@pytest.fixture(scope="session")
def pyramid_svs(tmp_path_factory: pytest.TempPathFactory, sample_rgb: np.ndarray) -> Path:
    """A 3-level Aperio-style pyramid of a 1024 x 1536 crop of the real region, 0.499 µm/px."""
    from equiseg_wsi.testing.slide_writer import write_aperio_pyramid

    path = tmp_path_factory.mktemp("pyramid") / "pyramid3.svs"
    write_aperio_pyramid(path, np.ascontiguousarray(sample_rgb[:1536, :1024]), mpp=0.499, n_levels=3)
    return path
