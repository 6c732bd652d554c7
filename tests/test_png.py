"""The pictures' PNG writer: lossless (the pixels and palette read back as written), its tEXt chunks kept, and
deterministic (the same picture gives the same bytes), whatever zlib strategy it uses for speed."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from equiseg_wsi.export.overlay import label_image, save_png
from equiseg_wsi.export.png import _pillow_png, png_bytes

DATA = Path(__file__).parent / "data"


def test_pictures_read_back_as_written(tmp_path: Path) -> None:
    rgb = Image.open(DATA / "cmu1_small_region_x4_crop256.png").convert("RGB")  # real H&E
    labels = (np.asarray(rgb).mean(axis=2) // 64).astype(np.int32)
    palette = label_image(labels, [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48)])
    for name, picture in (("overlay.png", rgb), ("labels.png", palette)):
        path = tmp_path / name
        save_png(path, picture, text={"equiseg:cell_um": "1.0"})
        first = path.read_bytes()
        save_png(path, picture, text={"equiseg:cell_um": "1.0"})
        assert path.read_bytes() == first
        with Image.open(path) as back:
            assert back.mode == picture.mode and back.text == {"equiseg:cell_um": "1.0"}
            assert np.array_equal(np.asarray(back), np.asarray(picture))
            if picture.mode == "P":
                assert back.getpalette() == picture.getpalette()


def _read(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as check:
        check.verify()  # chunk order, CRCs
    back = Image.open(io.BytesIO(data))
    back.load()
    return back


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_own_writer_reads_back_like_pillows(mode: str) -> None:
    """Pillow's reader, the reference, finds the same pixels, palette and text in the own writer's PNG as in
    Pillow's own PNG; 700 rows cross the writer's 256-row chunks, an odd width checks the row stride."""
    rgb = Image.open(DATA / "cmu1_small_region_x4_crop256.png").convert("RGB")
    big = Image.fromarray(np.tile(np.asarray(rgb), (3, 2, 1))[:700, :511])
    picture = big.convert(mode) if mode != "P" else big.quantize(200, method=Image.Quantize.MEDIANCUT)
    text = {"b:key": "1.0", "a:name": "Kern-Zellen µm²", "c:cjk": "細胞"}  # Latin-1, then beyond it (iTXt)
    own, theirs = _read(png_bytes(picture, text)), _read(_pillow_png(picture, text))
    for back in (own, theirs):
        assert back.mode == picture.mode and back.size == picture.size
        assert back.text == text
        assert np.array_equal(np.asarray(back), np.asarray(picture))
        if mode == "P":
            assert back.getpalette() == picture.getpalette()
    assert png_bytes(picture, text) == png_bytes(picture, text)


def test_own_writer_up_filter_is_the_row_difference() -> None:
    """The stored scanlines, decompressed, are filter byte 2 and each row minus the one above (mod 256)."""
    a = np.random.default_rng(0).integers(0, 256, (300, 7, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(a))
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    lines = np.frombuffer(zlib.decompress(data[start : start + length]), dtype=np.uint8).reshape(300, 22)
    assert (lines[:, 0] == 2).all()
    rows = a.reshape(300, 21)
    assert np.array_equal(lines[0, 1:], rows[0])
    assert np.array_equal(lines[1:, 1:], rows[1:] - rows[:-1])
