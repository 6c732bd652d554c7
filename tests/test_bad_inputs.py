"""The bad-input battery: every odd file gets a clear one-line error or a correct result, never a traceback,
a hang or a partial file, and one bad slide never stops the others."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--quiet", "--mpp", "0.5"]


def _tissue(rng: np.random.Generator, size: int) -> np.ndarray:
    from equiseg_wsi.slide import open_slide

    with open_slide(SAMPLE) as slide:
        x, y = int(rng.integers(600, 1400)), int(rng.integers(600, 2000))
        return slide.read_level(0, x, y, size, size)


def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A few hundred bytes that claim a side x side RGB image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("battery")
    rng = np.random.default_rng(3)
    rgb = _tissue(rng, 480)
    files: dict[str, Path] = {}

    def add(kind: str, name: str) -> Path:
        files[kind] = folder / name
        return files[kind]

    add("zero", "zero.svs").write_bytes(b"")
    add("truncated_svs", "truncated.svs").write_bytes(SAMPLE.read_bytes()[:900_000])
    corrupt = bytearray(SAMPLE.read_bytes())
    corrupt[200_000:1_200_000] = rng.integers(0, 256, 1_000_000, dtype=np.uint8).tobytes()
    add("corrupt_svs", "corrupt.svs").write_bytes(bytes(corrupt))
    Image.fromarray(rgb).save(folder / "_full.jpg", quality=90)
    add("truncated_jpg", "truncated.jpg").write_bytes((folder / "_full.jpg").read_bytes()[:5000])
    (folder / "_full.jpg").unlink()
    add("text_as_jpg", "notes.jpg").write_text("not an image\n")
    _png_bomb(add("bomb", "bomb.png"))
    Image.fromarray(rgb).convert("L").save(add("grey", "grey.png"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :100, 3] = 0  # a transparent strip reads as white glass
    Image.fromarray(rgba, "RGBA").save(add("rgba", "rgba.png"))
    grey16 = (np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(add("grey16", "grey16.png"))
    Image.fromarray(rgb).convert("CMYK").save(add("cmyk", "cmyk.jpg"), quality=92)
    Image.fromarray(_tissue(rng, 200)).save(add("tiny", "tiny.png"))  # 100 µm: far smaller than one tile
    Image.fromarray(np.full((400, 400, 3), 247, np.uint8)).save(add("blank", "blank.png"))
    add("all_tissue", "all tissue.png")  # copied below: a fully covered image with a space in its name
    Image.open(REPO / "tests" / "data" / "CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif").save(files["all_tissue"])
    Image.fromarray(rgb).save(add("non_ascii", "coupe é 标本.png"))
    return files


@pytest.fixture(scope="module")
def battery_run(battery: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("out")
    result = CliRunner().invoke(cli, ["run", str(next(iter(battery.values())).parent), "-o", str(out), *FAST])
    return result.exit_code, result.output, out


EXPECTED_FAIL = {
    "zero": "empty file",
    "truncated_svs": "truncated",
    "corrupt_svs": "",
    "truncated_jpg": "",
    "text_as_jpg": "cannot open",
    "bomb": "too large",
    "blank": "no tissue",
}
EXPECTED_DONE = ["grey", "rgba", "grey16", "cmyk", "tiny", "all_tissue", "non_ascii"]


def test_batch_goes_on_and_reports_each_failure(battery: dict[str, Path], battery_run: tuple[int, str, Path]) -> None:
    code, output, out = battery_run
    assert code == 1  # some slides failed
    assert "Traceback" not in output
    manifest = json.loads((out / "manifest.json").read_text())
    by_path = {Path(s["path"]).name: s for s in manifest["slides"]}
    for kind, words in EXPECTED_FAIL.items():
        entry = by_path[battery[kind].name]
        assert entry["status"] == "failed", kind
        assert str(battery[kind]) in entry["error"] and "\n" not in entry["error"], kind
        assert words.lower() in entry["error"].lower(), (kind, entry["error"])
        error_lines = [line for line in output.splitlines() if line.startswith("Error:") and battery[kind].name in line]
        assert len(error_lines) == 1, kind
    for kind in EXPECTED_DONE:
        assert by_path[battery[kind].name]["status"] == "done", (kind, by_path[battery[kind].name]["error"])


def test_failed_slides_leave_no_files(battery: dict[str, Path], battery_run: tuple[int, str, Path]) -> None:
    out = battery_run[2]
    for kind in EXPECTED_FAIL:
        folder = out / battery[kind].name.split(".")[0]
        assert not (folder / "slide.json").exists()
        leftovers = [p.name for p in folder.glob("*")] if folder.exists() else []
        assert not [n for n in leftovers if n.endswith((".geojson", ".csv"))], (kind, leftovers)
    assert not list(out.rglob(".tmp-*"))


def test_odd_pixel_formats_read_as_rgb(battery: dict[str, Path]) -> None:
    from equiseg_wsi.slide import open_slide

    reference = np.asarray(Image.open(battery["grey"]).convert("RGB"), dtype=np.float64)
    for kind in ("grey", "grey16"):
        with open_slide(battery[kind], mpp=0.5) as slide:
            rgb = slide.read_full(0.5)
        assert rgb.dtype == np.uint8 and rgb.shape == (480, 480, 3)
        assert np.abs(rgb - reference).max() <= 1, kind
    with open_slide(battery["rgba"], mpp=0.5) as slide:
        assert (slide.read_full(0.5)[:, :100] == 255).all()
    with open_slide(battery["cmyk"], mpp=0.5) as slide:
        cmyk = slide.read_full(0.5).astype(np.float64)
    assert np.abs(cmyk - np.asarray(Image.open(battery["non_ascii"]).convert("RGB"))).mean() < 8


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_output_folder_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go\n")
    code, output = _invoke(["run", str(SAMPLE), "-o", str(blocker / "out"), *FAST])
    assert code == 1 and "cannot write outputs here" in output and "Traceback" not in output


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, output = _invoke(["run", str(SAMPLE), "-o", str(out), *FAST])
    finally:
        out.chmod(0o755)
    assert code == 1 and "cannot write outputs here" in output


def test_manifest_problems(tmp_path: Path) -> None:
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("slide,core\nslide001,core001\n")
    code, output = _invoke(["run", str(no_path), "-o", str(tmp_path / "o1"), *FAST])
    assert code == 1 and "needs a 'processed' or 'path' column" in output and "Traceback" not in output
    escape = tmp_path / "sub" / "escape.csv"
    escape.parent.mkdir()
    escape.write_text("path\n../../../etc/passwd\n")
    code, output = _invoke(["run", str(escape), "-o", str(tmp_path / "o2"), *FAST])
    assert code == 1 and "leads outside the manifest's folder" in output
    missing = tmp_path / "missing.csv"
    missing.write_text("path\nnot_there.svs\n")
    code, output = _invoke(["run", str(missing), "-o", str(tmp_path / "o3"), *FAST])
    assert code == 1 and "not_there.svs" in output and "Traceback" not in output


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/equiseg-pwned",))


@pytest.mark.parametrize("kind", ["text", "pickle_with_code", "numpy"])
def test_weights_that_are_not_checkpoints(tmp_path: Path, kind: str) -> None:
    weights = tmp_path / "model.pth"
    if kind == "text":
        weights.write_text("hello\n")
    elif kind == "pickle_with_code":
        weights.write_bytes(pickle.dumps(_Exploit()))
    else:
        np.save(tmp_path / "model.npy", np.zeros(3))
        weights = tmp_path / "model.npy"
    code, output = _invoke(["run", str(SAMPLE), "-o", str(tmp_path / "out"), "--weights", str(weights), *FAST])
    assert code != 0 and str(weights) in output and "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("Error:")]) == 1
    assert not Path("/tmp/equiseg-pwned").exists()
