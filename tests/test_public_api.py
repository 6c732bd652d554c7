"""The public surface: what `equiseg_wsi` names loads lazily, and the README's Python example runs as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_every_public_name_resolves_without_importing_torch_first() -> None:
    code = ("import sys, equiseg_wsi as e; assert 'torch' not in sys.modules; "
            "missing = [n for n in e.__all__ if not hasattr(e, n)]; print(missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_is_an_attribute_error() -> None:
    import equiseg_wsi

    with pytest.raises(AttributeError):
        equiseg_wsi.load_record  # noqa: B018  (internal, not part of the surface)


def test_readme_python_example_runs(tmp_path: Path) -> None:
    """The example uses only names from `equiseg_wsi` and writes the outputs `equiseg run` writes."""
    code = _readme_example()
    imported = set(re.findall(r"\beq\.(\w+)", code))
    import equiseg_wsi

    assert imported <= set(equiseg_wsi.__all__), imported - set(equiseg_wsi.__all__)
    assert "from equiseg_wsi." not in code
    (tmp_path / "sample_data").symlink_to(REPO / "sample_data")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "µm per cell" in out.stdout and "'done'" in out.stdout
    run = tmp_path / "python_out"
    assert (run / "manifest.json").is_file() and (run / "biomarkers.csv").is_file()
    assert (run / "slide001_core001" / "slide001_core001.geojson").is_file()
