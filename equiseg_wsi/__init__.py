"""equiseg_wsi: rotation-robust unsupervised segmentation of TMA cores and whole-slide images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("equiseg-wsi")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
