"""The run-level files: `OUT/manifest.json`, `OUT/biomarkers.csv`, `OUT/cluster_key.png`, `OUT/report.html`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from equiseg_wsi import __version__
from equiseg_wsi.biomarkers import is_measured, write_csv
from equiseg_wsi.errors import InputError
from equiseg_wsi.export.atomic import atomic_write_text
from equiseg_wsi.export.cluster_key import write_cluster_key
from equiseg_wsi.features import build_extractor
from equiseg_wsi.options import RunJob
from equiseg_wsi.region_outputs import json_default
from equiseg_wsi.run_key import REDO_REASONS
from equiseg_wsi.slide_result import SlideResult

log = logging.getLogger("equiseg_wsi.runner")


def check_writable(out_dir: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / ".equiseg-write-test", "ok\n", fsync=False)
        (out_dir / ".equiseg-write-test").unlink()
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot write outputs here ({exc.strerror or exc})") from exc


def write_run_outputs(
    out_dir: Path, results: Sequence[SlideResult], job: RunJob, *, stopped: str | None = None, **model_extra: Any
) -> tuple[Path, Path | None]:
    """`OUT/manifest.json` (tool, options, model, per-slide status) and `OUT/biomarkers.csv` (all regions).

    The manifest's `model` names the feature identity and the applied KMeans model, plus `model_extra`;
    `stopped` says why the run stopped before every slide was tried (a signal's name, the write error), or is
    None."""
    options = job.options
    model_info = {"extractor": build_extractor(job.spec).feature_identity.as_dict(), "kmeans_model": job.kmeans_model,
                  **model_extra}
    rows = [row for r in results for row in r.regions]
    redone = [r for r in results if r.status == "done"]  # a failed retry is counted as failed
    mismatch = _column_mismatch(out_dir, results)
    table = write_csv(out_dir / "biomarkers.csv", rows) if rows and mismatch is None else None
    if table is None:  # an earlier run's table would pass for this run's
        (out_dir / "biomarkers.csv").unlink(missing_ok=True)
    manifest = {
        "tool": "equiseg",
        "version": __version__,
        "options": options.as_dict(),
        "model": model_info,
        "slides": [r.as_dict() for r in results],
        "summary": {
            "slides": len(results),
            "done": sum(r.status in ("done", "skipped") for r in results),
            "failed": sum(r.status == "failed" for r in results),
            "regions": sum(is_measured(row) for row in rows),  # missing TMA cores have rows but no region
        },
        "stopped": stopped,
        "resume": {  # slides complete from an earlier run, and those redone because what made them changed
            "skipped": sum(r.status == "skipped" for r in results),
            "redone": sum(bool(r.redone) for r in redone),
            "redone_because": {REDO_REASONS[part]: sum(part in r.redone for r in redone) for part in REDO_REASONS},
        },
    }
    path = out_dir / "manifest.json"
    from equiseg_wsi.export.report import REPORT_NAME, write_report

    (out_dir / REPORT_NAME).unlink(missing_ok=True)  # an earlier run's would pass for this one's
    write_cluster_key(out_dir, [r.as_dict() for r in results], options, job.kmeans_model)  # OUT/cluster_key.png
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=json_default) + "\n")
    try:  # OUT/report.html, drawn from the files just written; one that does not fit leaves the manifest be
        write_report(out_dir)
    except OSError as exc:
        log.warning("%s: not written (%s)", out_dir / REPORT_NAME, exc.strerror or exc)
    if mismatch is not None:
        raise InputError(mismatch)
    return path, table


def _column_mismatch(out_dir: Path, results: Sequence[SlideResult]) -> str | None:
    """Why the slides' tables cannot be merged into one (rows with other columns), naming the two files."""
    first: tuple[str, list[str]] | None = None
    for r in results:
        for row in r.regions:
            if first is None:
                first = (r.name, list(row))
            elif set(row) != set(first[1]):
                extra = [c for c in row if c not in first[1]]
                lacking = [c for c in first[1] if c not in row]
                return (f"{out_dir / 'biomarkers.csv'}: not written: {out_dir / first[0] / 'biomarkers.csv'} and "
                        f"{out_dir / r.name / 'biomarkers.csv'} have different columns (only in the second: "
                        f"{', '.join(extra) or 'none'}; only in the first: {', '.join(lacking) or 'none'}); "
                        "rerun these slides with the same options (--overwrite redoes them all)")
    return None
