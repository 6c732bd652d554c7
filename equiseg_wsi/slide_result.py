"""What a run records about one slide: `OUT/<slide>/slide.json`, one entry of the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SlideResult"]


@dataclass
class SlideResult:
    """What a run records about one slide (small: workers on other machines return this)."""

    name: str
    path: str
    status: str  # "done", "failed", "skipped" (already complete), "stopped" (not finished: the run stopped first)
    error: str | None = None
    regions: list[dict[str, Any]] = field(default_factory=list)  # biomarker rows
    outputs: list[str] = field(default_factory=list)
    failed_regions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one line each (too few cells, clusters that vanished)
    seconds: dict[str, float] = field(default_factory=dict)
    tissue_area_mm2: float = 0.0
    run_key: dict[str, str] = field(default_factory=dict)  # digests of the options, model and input that made it
    redone: list[str] = field(default_factory=list)  # parts of the run key that changed since the last complete run
    exemplars: list[dict[str, Any]] = field(default_factory=list)  # cells nearest each cluster's centre (cluster key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
