"""Loading and saving model weights safely, and the model identity recorded in manifests.

A checkpoint is untrusted input: it is always read with ``torch.load(weights_only=True)``, so a pickle that
carries code is refused before anything runs.  Two formats are read:

* reference SRE-Conv checkpoints (``sre-conv==1.0.2``): a raw state_dict, or a dict with ``state_dict``;
  keys may be prefixed ``module.``; the reference's fixed ``weight_index_mat`` buffers are ignored.  The
  architecture is inferred from the tensor shapes.
* the project format: ``{"format": "equiseg-weights", "version": 1, "state_dict": ..., "meta": {...}}`` with
  ``meta`` holding the arch spec, input normalisation, default feature layer, provenance and free-form
  training info (plain types only), so the file alone rebuilds its model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsError
from ..export.atomic import atomic_path
from ..files import file_kind, size_text
from .arch import DEFAULT_LAYER, ArchSpec, default_arch
from .resnet import ResNetFeatures, build_model

__all__ = [
    "DEFAULT_LAYER",
    "DEFAULT_NORMALIZATION",
    "LoadedModel",
    "RANDOM_INIT",
    "default_weights",
    "has_default_weights",
    "identity_hash",
    "infer_arch",
    "load_weights",
    "random_model",
    "save_weights",
    "write_torch_file",
]

FORMAT_NAME = "equiseg-weights"
FORMAT_VERSION = 1
# The reference models were trained on inputs scaled to [-1, 1]: (x/255 - 0.5) / 0.5.
DEFAULT_NORMALIZATION: dict[str, list[float]] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
_IGNORED_SUFFIXES = ("weight_index_mat",)
RANDOM_INIT = "random"
"""Pass as ``weights`` to get the seeded random initialisation instead of the packaged trained model."""
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# The packaged models (docs/model_card.md): trained with dense gland-mask supervision on the EBHI-Seg
# development cases (float32); the standard-convolution twin, trained the same way, is used when installed.
DEFAULT_WEIGHT_FILES = {"sre": "default_sre.pt", "standard": "default_standard.pt"}
RETRAIN_COMMAND = (
    "python scripts/train_default_model.py --kind {kind} --out OUT (in a clone of the repository, with "
    "../shared/data/ebhi_seg; then copy OUT/weights.pt to {path})"
)
_MAX_LISTED = 5
# Zip bombs: torch.save stores entries uncompressed, so a real checkpoint unpacks to about its own size, while
# a deflated one can claim 1000x that (torch allocates what the archive declares and inflates into it).  Refuse
# archives that would unpack to more than _UNPACKED_RATIO x the file AND more than _UNPACKED_FLOOR: large
# honest checkpoints pass whatever their size (memory is then the user's choice), small recompressed ones too.
_UNPACKED_RATIO = 64
_UNPACKED_FLOOR = 256 << 20


@dataclass
class LoadedModel:
    """A model in eval mode plus what identifies it (see :meth:`identity`)."""

    model: ResNetFeatures
    arch: ArchSpec
    normalization: dict[str, list[float]] = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    layer: str = DEFAULT_LAYER
    source: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """Model identity: arch, normalisation, layer and source ("random-init seed=N" or "sha256:<hex>")."""
        return model_identity(self.arch, self.normalization, self.layer, self.source)


def model_identity(arch: ArchSpec, normalization: Mapping[str, Any], layer: str | list[str],
                   source: str) -> dict[str, Any]:
    """The dict other parts record in manifests and compare before reusing saved cluster models."""
    return {
        "arch": arch.to_dict(),
        "normalization": {"mean": [float(v) for v in normalization["mean"]],
                          "std": [float(v) for v in normalization["std"]]},
        "layer": layer if isinstance(layer, str) else list(layer),
        "source": source,
    }


def identity_hash(identity: Mapping[str, Any]) -> str:
    """Stable short hash of an identity dict (sha256 of its canonical JSON, first 16 hex digits)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _check_file(path: Path) -> None:
    """A regular, non-empty file whose zip entries (torch's format) do not unpack to far more than its size."""
    try:
        info = path.stat()  # follows symlinks: a link to /dev/zero is a character device, not "not found"
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise WeightsError(f"{path}: weights file is not a regular file ({file_kind(info.st_mode)})")
    if info.st_size == 0:
        raise WeightsError(f"{path}: weights file is empty")
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (legacy torch format, or garbage that torch.load will name)
    if unpacked > _UNPACKED_RATIO * info.st_size and unpacked > _UNPACKED_FLOOR:
        raise WeightsError(f"{path}: a weights file of {size_text(info.st_size)} that would unpack to "
                           f"{size_text(unpacked)} (over {_UNPACKED_RATIO}x its size): refused as a zip bomb, "
                           "nothing loaded")


def _check_finite(sd: Mapping[str, Tensor], meta: Mapping[str, Any] | None, path: Path) -> None:
    """NaN or infinite weights (or normalisation) would make every slide fail: refuse them at load."""
    for key, value in sd.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise WeightsError(f"{path}: tensor {key} holds NaN or infinite values (a diverged or damaged model)")
    norm = (meta or {}).get("normalization", DEFAULT_NORMALIZATION)
    try:
        values = [float(v) for v in norm["mean"]] + [float(v) for v in norm["std"]]
        usable = all(math.isfinite(v) for v in values) and all(float(v) != 0 for v in norm["std"])
    except (KeyError, TypeError, ValueError):
        usable = False
    if not usable:
        raise WeightsError(f"{path}: invalid input normalization {repr(norm)[:200]} (needs finite mean and "
                           "non-zero std)")


def _read_checkpoint(path: Path) -> Any:
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means "not safe weights"
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            cause = "it contains Python objects/code that a weights file must not hold (refused, nothing run)"
        raise WeightsError(f"{path}: not a loadable PyTorch weights file: {cause}") from None


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Return (state_dict, project meta or None)."""
    meta = None
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        meta = obj.get("meta")
        if not isinstance(meta, Mapping):
            raise WeightsError(f"{path}: project weights file without a 'meta' dict")
        obj = obj.get("state_dict")
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: no state_dict found (expected a dict of tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{path}: state_dict holds entries that are not tensors: {_list_keys(bad)}")
    sd: dict[str, Tensor] = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        sd[k] = v
    return sd, (dict(meta) if meta is not None else None)


def infer_arch(state_dict: Mapping[str, Tensor], source: str = "state_dict") -> ArchSpec:
    """Infer the ArchSpec of a reference-layout state_dict from its tensor shapes."""
    w = state_dict.get("conv1.weight")
    if w is None:
        raise WeightsError(f"{source}: not an SRE-ResNet/ResNet checkpoint: missing key conv1.weight")
    if w.ndim == 3:
        kind, stem_k = "sre", 2 * w.shape[-1] - 1
    elif w.ndim == 4 and w.shape[-1] == w.shape[-2]:
        kind, stem_k = "standard", int(w.shape[-1])
    else:
        raise WeightsError(f"{source}: conv1.weight has unexpected shape {tuple(w.shape)}")
    stage_re = re.compile(r"^layer(\d+)\.(\d+)\.")
    blocks: dict[int, int] = {}
    for k in state_dict:
        m = stage_re.match(k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            blocks[s] = max(blocks.get(s, 0), b + 1)
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise WeightsError(f"{source}: no layer1..layerN blocks found; not an SRE-ResNet/ResNet checkpoint")
    widths, ks, strides = [], [], []
    for s in range(1, len(blocks) + 1):
        c2 = state_dict.get(f"layer{s}.0.conv2.weight")
        if c2 is None:
            raise WeightsError(f"{source}: missing key layer{s}.0.conv2.weight")
        widths.append(int(c2.shape[0]))
        ks.append(2 * int(c2.shape[-1]) - 1 if kind == "sre" else int(c2.shape[-1]))
        strides.append(2 if any(k.startswith(f"layer{s}.0.conv1.1.") for k in state_dict) else 1)
    fc = state_dict.get("fc.weight")
    try:
        return ArchSpec(kind=kind, stem_kernel=stem_k, kernel_sizes=tuple(ks), widths=tuple(widths),
                        blocks=tuple(blocks[s] for s in sorted(blocks)), strides=tuple(strides),
                        num_classes=int(fc.shape[0]) if fc is not None else 0,
                        in_channels=int(w.shape[1]))
    except ValueError as exc:
        raise WeightsError(f"{source}: unsupported architecture: {exc}") from None


def _check_and_load(model: ResNetFeatures, sd: Mapping[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_list_keys(wrong)}")
    if problems:
        raise WeightsError(f"{path}: weights do not fit the {model.spec.kind} model: " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def load_weights(path: str | os.PathLike[str], arch: ArchSpec | None = None) -> LoadedModel:
    """Load a reference or project checkpoint into a fresh model in eval mode.

    ``arch`` (optional) is the architecture the caller expects; without it the file's own (project format)
    or the shapes (reference format) decide.  Any mismatch raises WeightsError naming the file and keys.
    """
    p = Path(path)
    obj = _read_checkpoint(p)
    sd, meta = _split_checkpoint(obj, p)
    _check_finite(sd, meta, p)
    normalization = dict(DEFAULT_NORMALIZATION)
    layer = DEFAULT_LAYER
    provenance: dict[str, Any] = {}
    training: dict[str, Any] = {}
    if meta is not None:
        try:
            file_arch = ArchSpec.from_dict(dict(meta["arch"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{p}: project weights file with an invalid 'arch' entry: {exc}") from None
        normalization = dict(meta.get("normalization", normalization))
        layer = meta.get("layer", layer)
        provenance = dict(meta.get("provenance", {}))
        training = dict(meta.get("training", {}))
    else:
        file_arch = infer_arch(sd, str(p))
        provenance = {"format": "reference sre-conv state_dict"}
    if arch is not None and arch != file_arch:
        raise WeightsError(f"{p}: weights are for {file_arch.to_dict()}, expected {arch.to_dict()}")
    model = build_model(file_arch)
    _check_and_load(model, sd, p)
    model.eval()
    return LoadedModel(model=model, arch=file_arch, normalization=normalization, layer=layer,
                       source=f"sha256:{_sha256_file(p)}", provenance=provenance, training=training)


def default_weights(kind: str = "sre") -> Path:
    """Path of the packaged trained model of ``kind`` ("sre", or "standard" for the twin).

    Both ship with the package. When a file is missing (a trimmed install) this raises WeightsError with the exact
    (deterministic) command that trains it.
    """
    if kind not in DEFAULT_WEIGHT_FILES:
        raise WeightsError(f"no default model for kind {kind!r}; choose from {sorted(DEFAULT_WEIGHT_FILES)}")
    path = DATA_DIR / DEFAULT_WEIGHT_FILES[kind]
    if not path.is_file():
        raise WeightsError(f"{path}: the default {kind} model is not installed; train it with: "
                           + RETRAIN_COMMAND.format(kind=kind, path=path))
    return path


def has_default_weights(kind: str = "sre") -> bool:
    """True when :func:`default_weights` would find the packaged model of ``kind``."""
    return kind in DEFAULT_WEIGHT_FILES and (DATA_DIR / DEFAULT_WEIGHT_FILES[kind]).is_file()


def random_model(arch: ArchSpec | None = None, seed: int = 0) -> LoadedModel:
    """A seeded random initialisation (activations of order one), labelled as such in its identity."""
    arch = arch or default_arch()
    model = build_model(arch, seed=seed).eval()
    return LoadedModel(model=model, arch=arch, source=f"random-init seed={int(seed)}",
                       provenance={"random_init_seed": int(seed)})


def save_weights(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    arch: ArchSpec,
    normalization: Mapping[str, Any] | None = None,
    layer: str = DEFAULT_LAYER,
    provenance: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write the project format atomically (temporary name, then rename); returns the path."""
    p = Path(path)
    norm = dict(normalization or DEFAULT_NORMALIZATION)
    meta = {
        "arch": arch.to_dict(),
        "normalization": {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]},
        "layer": layer,
        "provenance": dict(provenance or {}),
        "training": dict(training or {}),
    }
    try:  # metadata must be plain data so that weights_only loading accepts it
        json.dumps(meta)
    except TypeError as exc:
        raise WeightsError(f"{p}: metadata must be plain JSON-like data: {exc}") from None
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    obj = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "state_dict": sd, "meta": meta}
    return write_torch_file(p, obj)


def write_torch_file(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` published atomically (see :mod:`equiseg_wsi.export.atomic`); returns the path.

    Saved through an open file, so the archive's inner folder is always named "archive": given a path, torch
    names it after the (random) temporary file, and equal content would differ byte for byte.
    """
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "xb") as fh:
        torch.save(obj, fh)
    return target
