"""The pictures' PNG writer: lossless (the pixels and palette read back as written), its tEXt chunks kept, and
deterministic (the same picture gives the same bytes), whatever zlib strategy it uses for speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from equiseg_wsi.export.overlay import label_image, save_png

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
