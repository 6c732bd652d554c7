"""equiseg_wsi: rotation-robust unsupervised segmentation of TMA cores and whole-slide images.

The public surface is what this module names; everything else is internal and may change. Names are loaded
on first use, so `import equiseg_wsi` stays cheap (PyTorch is imported only when a model is built).

- Slides: `open_slide`, `Slide`, `collect_inputs`, `SlideSource`.
- Options (every default and validation rule): `SegmentOptions`, `RegionOptions`, `RunOptions`, `RunJob`.
- Features: `ExtractorSpec` and `build_extractor` (the one way to build the CNN), `FeatureIdentity`.
- One region: `slide_regions`, `RegionArea`, `segment_region`, `RegionSegmentation`.
- Many slides: `run_slides` (in this process, or `DaskExecutor` from `equiseg_wsi.distributed`),
  `SlideResult`, `write_run_outputs`.
- Cohort clustering: `fit_cohort`, `ClusterModel`.
- Errors: `EquisegError` and its subclasses in `equiseg_wsi.errors`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("equiseg-wsi")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from equiseg_wsi.cluster import ClusterModel
    from equiseg_wsi.cohort import fit_cohort
    from equiseg_wsi.errors import EquisegError
    from equiseg_wsi.features import FeatureIdentity, build_extractor
    from equiseg_wsi.inputs import SlideSource, collect_inputs
    from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions
    from equiseg_wsi.regions import RegionArea, slide_regions
    from equiseg_wsi.run_files import write_run_outputs
    from equiseg_wsi.runner import run_slides
    from equiseg_wsi.segment import RegionSegmentation, segment_region
    from equiseg_wsi.slide import Slide, open_slide
    from equiseg_wsi.slide_result import SlideResult

_WHERE: dict[str, str] = {
    "ClusterModel": "cluster",
    "fit_cohort": "cohort",
    "EquisegError": "errors",
    "ExtractorSpec": "options",
    "build_extractor": "features",
    "FeatureIdentity": "features",
    "SlideSource": "inputs",
    "collect_inputs": "inputs",
    "RegionOptions": "options",
    "RunJob": "options",
    "RunOptions": "options",
    "SegmentOptions": "options",
    "RegionArea": "regions",
    "slide_regions": "regions",
    "SlideResult": "slide_result",
    "run_slides": "runner",
    "write_run_outputs": "run_files",
    "RegionSegmentation": "segment",
    "segment_region": "segment",
    "Slide": "slide",
    "open_slide": "slide",
}

__all__ = [
    "ClusterModel",
    "EquisegError",
    "ExtractorSpec",
    "FeatureIdentity",
    "RegionArea",
    "RegionOptions",
    "RegionSegmentation",
    "RunJob",
    "RunOptions",
    "SegmentOptions",
    "Slide",
    "SlideResult",
    "SlideSource",
    "__version__",
    "build_extractor",
    "collect_inputs",
    "fit_cohort",
    "open_slide",
    "run_slides",
    "segment_region",
    "slide_regions",
    "write_run_outputs",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'equiseg_wsi' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"equiseg_wsi.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
