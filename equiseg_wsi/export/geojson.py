"""QuPath's GeoJSON dialect (QuPath 0.4-0.7): build features, check them, write them.

QuPath is strict in ways plain GeoJSON is not: the object type lives in ``properties.objectType`` (and
``properties.type`` would be misread as one), a classification needs both ``name`` and ``color``,
measurements are a flat dict of finite numbers, ids must be hyphenated UUIDs, and since 0.6 every geometry is
snapped to a 0.01 px grid and one invalid geometry fails the whole import. ``qupath_feature`` only builds
features that follow these rules, ``qupath_problems`` (defined in ``qupath_check``) checks any collection
against them, and ``write_geojson`` writes deterministically (byte-identical output for identical input) and
atomically.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import json
import math
import numbers
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape as shapely_shape
from shapely.geometry.base import BaseGeometry

from equiseg_wsi.errors import InputError
from equiseg_wsi.export.atomic import atomic_write_bytes
from equiseg_wsi.export.qupath_check import OBJECT_TYPES, SNAP_GRID, UUID_RE, qupath_problems

__all__ = [
    "EQUISEG_NAMESPACE",
    "OBJECT_TYPES",
    "OKABE_ITO",
    "GeoJSONError",
    "cluster_class_name",
    "cluster_color",
    "cluster_names",
    "feature_collection",
    "geojson_bytes",
    "object_id",
    "qupath_feature",
    "qupath_problems",
    "read_geojson",
    "write_geojson",
]

#: Namespace of every uuid5 this package makes: ids depend only on the names given to ``object_id``.
EQUISEG_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/equiseg-wsi/object-id")

#: Okabe & Ito (2008) colour-blind-safe palette, in the order clusters use it (black last: hides tissue).
OKABE_ITO: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
    (0, 0, 0),  # black
)

_GZ_SUFFIX = ".geojson.gz"
_SUFFIX = ".geojson"


class GeoJSONError(InputError, ValueError):
    """A feature or file would not import into QuPath (or a bad output path was asked for)."""


# ----------------------------------------------------------------------------------------------------------
# Names, ids, colours
# ----------------------------------------------------------------------------------------------------------


def object_id(*parts: object) -> str:
    """Deterministic hyphenated UUID (uuid5) from names, e.g. ``object_id(slide, region, "Cluster 2")``.

    Parts are joined unambiguously (as a JSON list of strings), so ("a/b", "c") and ("a", "b/c") differ.
    """
    if not parts:
        raise GeoJSONError("object_id needs at least one name part")
    key = json.dumps([str(p) for p in parts], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(EQUISEG_NAMESPACE, key))


def cluster_class_name(i: int) -> str:
    """QuPath class name of cluster ``i`` (label id, 1-based): ``"Cluster i"``."""
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 1:
        raise GeoJSONError(f"cluster ids start at 1, got {i!r}")
    return f"Cluster {int(i)}"


def cluster_names(k: int, given: Sequence[str] = ()) -> list[str]:
    """QuPath class names of clusters 1..k: the names `given` (``--cluster-names``, one per cluster), else
    ``"Cluster i"``. Colours never depend on the names (``cluster_color`` goes by the cluster id)."""
    if given:
        if len(given) != k:
            raise GeoJSONError(f"{len(given)} cluster name(s) given for {k} clusters")
        return [_check_class_name(n, "cluster name") for n in given]
    return [cluster_class_name(i + 1) for i in range(k)]


def cluster_color(k_index: int) -> tuple[int, int, int]:
    """Fixed colour of the cluster at 0-based index ``k_index`` (cluster id ``k_index + 1``).

    The first 8 are Okabe-Ito (colour-blind safe); beyond that, a deterministic golden-angle walk through hue
    (distinct, not guaranteed colour-blind safe).
    """
    if isinstance(k_index, bool) or not isinstance(k_index, numbers.Integral) or k_index < 0:
        raise GeoJSONError(f"cluster colour index must be an integer >= 0, got {k_index!r}")
    k = int(k_index)
    if k < len(OKABE_ITO):
        return OKABE_ITO[k]
    j = k - len(OKABE_ITO)
    hue = (0.11 + j * 0.6180339887498949) % 1.0
    sat = (0.75, 0.55)[j % 2]
    val = (0.85, 0.65)[(j // 2) % 2]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _name_color(name: str) -> tuple[int, int, int]:
    """Stable colour for a class without an explicit one (QuPath needs a colour with every class name)."""
    m = re.fullmatch(r"Cluster ([1-9][0-9]*)", name)
    if m:
        return cluster_color(int(m.group(1)) - 1)
    digest = uuid.uuid5(EQUISEG_NAMESPACE, "class:" + name).bytes
    return digest[0], digest[1], digest[2]


# ----------------------------------------------------------------------------------------------------------
# Building features
# ----------------------------------------------------------------------------------------------------------


def _check_class_name(name: object, where: str = "class name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise GeoJSONError(f"{where} must be a non-empty string, got {name!r}")
    if ":" in name or "\n" in name or "\r" in name:
        raise GeoJSONError(f"{where} {name!r} must not contain ':' or a newline (QuPath splits on them)")
    return name


def _check_color(color: object) -> list[int]:
    if isinstance(color, (str, bytes)) or not isinstance(color, Sequence) or len(color) != 3:
        raise GeoJSONError(f"colour must be three integers [r, g, b], got {color!r}")
    out = []
    for c in color:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c) <= 255:
            raise GeoJSONError(f"colour components must be integers 0-255, got {color!r}")
        out.append(int(c))
    return out


def _number(value: object, name: str) -> int | float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise GeoJSONError(f"measurement {name!r} must be a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    f = float(value)
    if not math.isfinite(f):
        raise GeoJSONError(f"measurement {name!r} must be finite, got {f!r} (QuPath rejects NaN/inf)")
    return f


def _geometry_dict(geometry: Any, on_grid: bool = False) -> dict[str, Any]:
    """A GeoJSON geometry mapping for a shapely geometry or anything with ``__geo_interface__``."""
    geom: BaseGeometry
    if on_grid and isinstance(geometry, BaseGeometry) and geometry.geom_type in ("Polygon", "MultiPolygon") \
            and not geometry.is_empty:
        return {"type": geometry.geom_type, "coordinates": _snapped_coords(geometry)}
    if isinstance(geometry, BaseGeometry):
        geom = geometry
    else:
        mapping = geometry.__geo_interface__ if hasattr(geometry, "__geo_interface__") else geometry
        if not isinstance(mapping, Mapping):
            raise GeoJSONError(f"geometry must be a shapely geometry or a GeoJSON mapping, got {type(geometry)}")
        try:
            geom = shapely_shape(dict(mapping))
        except Exception as exc:  # shapely raises several types for malformed input
            raise GeoJSONError(f"geometry cannot be read: {exc}") from exc
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise GeoJSONError(f"geometry must be a Polygon or MultiPolygon, got {geom.geom_type}")
    if geom.is_empty:
        raise GeoJSONError("geometry is empty")
    snapped = shapely.set_precision(geom, SNAP_GRID, mode="pointwise")
    if not snapped.is_valid:
        raise GeoJSONError(
            f"geometry is invalid after snapping to 0.01 px ({shapely.is_valid_reason(snapped)}); "
            "use equiseg_wsi.polygons.snap_valid first"
        )
    return {"type": snapped.geom_type, "coordinates": _snapped_coords(snapped)}


def _snapped_coords(geom: BaseGeometry) -> list[Any]:
    """GeoJSON coordinates of a (Multi)Polygon already snapped to 0.01 px: rounded to two decimals as plain
    floats (negative zero folded to zero), in numpy rather than per number in Python, for all rings at once
    (a core's segments have thousands of rings)."""
    parts = [geom] if geom.geom_type == "Polygon" else list(shapely.get_parts(geom))
    rings, owner = shapely.get_rings(parts, return_index=True)  # each polygon's exterior, then its holes
    ends = np.cumsum(shapely.get_num_coordinates(rings)).tolist()
    flat: list[list[float]] = (np.round(shapely.get_coordinates(rings), 2) + 0.0).tolist()
    polygons: list[list[list[list[float]]]] = [[] for _ in parts]
    start = 0
    for i, end in zip(owner.tolist(), ends, strict=True):
        polygons[i].append(flat[start:end])
        start = end
    return polygons[0] if geom.geom_type == "Polygon" else polygons


def qupath_feature(
    geometry: Any,
    *,
    object_id: str,
    object_type: str = "annotation",
    name: str | None = None,
    class_name: str | None = None,
    color: Sequence[int] | None = None,
    measurements: Mapping[str, float] | None = None,
    metadata: Mapping[str, object] | None = None,
    locked: bool = False,
    child_objects: Iterable[Mapping[str, Any]] | None = None,
    on_grid: bool = False,
) -> dict[str, Any]:
    """One QuPath GeoJSON Feature; raises ``GeoJSONError`` (a ValueError) for anything QuPath would reject.

    ``geometry``: shapely Polygon/MultiPolygon (or GeoJSON mapping), snapped here to 0.01 px and required to
    stay valid; ``on_grid``: it comes from ``polygons.snap_valid`` (already snapped and valid) and is used as it
    is (``write_geojson`` still checks the whole file). ``class_name`` gets ``color`` or, if none is given, the
    cluster palette colour for ``"Cluster i"`` and a stable name-derived colour otherwise. ``metadata`` values
    become strings.
    """
    if not isinstance(object_id, str) or not UUID_RE.match(object_id):
        raise GeoJSONError(f"object_id must be a hyphenated UUID string, got {object_id!r}")
    if object_type not in OBJECT_TYPES:
        raise GeoJSONError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        if not isinstance(name, str):
            raise GeoJSONError(f"name must be a string, got {name!r}")
        props["name"] = name
    if class_name is not None:
        cname = _check_class_name(class_name)
        rgb = _check_color(color) if color is not None else list(_name_color(cname))
        props["classification"] = {"name": cname, "color": rgb}
    elif color is not None:
        raise GeoJSONError("color is the colour of a classification: give class_name too")
    props["isLocked"] = bool(locked)
    if measurements:
        meas: dict[str, int | float] = {}
        for key, value in measurements.items():
            if not isinstance(key, str) or not key:
                raise GeoJSONError(f"measurement names must be non-empty strings, got {key!r}")
            meas[key] = _number(value, key)
        props["measurements"] = meas
    if metadata:
        meta: dict[str, str] = {}
        for key, item in metadata.items():
            if not isinstance(key, str) or not key:
                raise GeoJSONError(f"metadata keys must be non-empty strings, got {key!r}")
            meta[key] = "" if item is None else str(item)
        props["metadata"] = meta
    if child_objects is not None:
        children = [dict(c) for c in child_objects]
        if children:
            props["childObjects"] = children
    return {"type": "Feature", "id": object_id, "geometry": _geometry_dict(geometry, on_grid), "properties": props}


def feature_collection(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Wrap features in a GeoJSON FeatureCollection (QuPath imports one per file)."""
    return {"type": "FeatureCollection", "features": [dict(f) for f in features]}


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

_FEATURE_KEYS = ("type", "id", "geometry", "properties")
_PROPERTY_KEYS = ("objectType", "name", "classification", "isLocked", "measurements", "metadata", "childObjects")


def _canonical(feat: Mapping[str, Any]) -> dict[str, Any]:
    """Fixed key order (known keys first, in QuPath's order; others sorted) so output bytes are stable."""
    out: dict[str, Any] = {k: feat[k] for k in _FEATURE_KEYS if k in feat}
    out.update({k: feat[k] for k in sorted(feat) if k not in _FEATURE_KEYS})
    props = feat.get("properties")
    if isinstance(props, Mapping):
        p: dict[str, Any] = {k: props[k] for k in _PROPERTY_KEYS if k in props}
        p.update({k: props[k] for k in sorted(props) if k not in _PROPERTY_KEYS})
        if isinstance(p.get("classification"), Mapping):
            cls = p["classification"]
            p["classification"] = {k: cls[k] for k in ("name", "color") if k in cls}
        if isinstance(p.get("childObjects"), list):
            p["childObjects"] = [_canonical(c) if isinstance(c, Mapping) else c for c in p["childObjects"]]
        out["properties"] = p
    return out


def _json_default(obj: object) -> object:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default)


def geojson_bytes(features_or_collection: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> bytes:
    """The exact UTF-8 text ``write_geojson`` writes: one feature per line, fixed key order, no NaN."""
    if isinstance(features_or_collection, Mapping):
        features = features_or_collection.get("features")
        if features_or_collection.get("type") != "FeatureCollection" or not isinstance(features, list):
            raise GeoJSONError("expected a FeatureCollection or a list of features")
    else:
        features = list(features_or_collection)
    try:
        lines = [_dumps(_canonical(f)) for f in features]
    except ValueError as exc:  # NaN/inf from allow_nan=False
        raise GeoJSONError(f"GeoJSON cannot hold this value: {exc}") from exc
    body = ",\n".join(lines)
    text = '{"type":"FeatureCollection","features":[\n' + body + ("\n" if lines else "") + "]}\n"
    return text.encode("utf-8")


def _check_suffix(path: Path) -> bool:
    """True for .geojson.gz, False for .geojson; refuse anything else with the reason."""
    name = path.name.lower()
    if name.endswith(_GZ_SUFFIX):
        return True
    if name.endswith(_SUFFIX):
        return False
    if name.endswith(".json") or name.endswith(".json.gz"):
        raise GeoJSONError(f"{path}: use the .geojson suffix, not .json (QuPath parses a dropped .json twice)")
    raise GeoJSONError(f"{path}: a QuPath GeoJSON file must end in .geojson or .geojson.gz")


def write_geojson(
    path: str | os.PathLike[str],
    features_or_collection: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    validate: bool = True,
) -> Path:
    """Write features as QuPath GeoJSON (``.geojson`` or gzip ``.geojson.gz``), atomically; return the path.

    Identical input gives byte-identical files (fixed key order, shortest round-trip floats, gzip without
    timestamp or file name). With ``validate`` (default) the collection is checked with ``qupath_problems``
    first and nothing is written if QuPath would reject it.
    """
    target = Path(path)
    gz = _check_suffix(target)
    if isinstance(features_or_collection, Mapping):
        collection = features_or_collection
    else:
        collection = feature_collection(features_or_collection)
    if validate:
        problems = qupath_problems(collection)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise GeoJSONError(f"{target}: QuPath would reject this GeoJSON: {problems[0]}{more}")
    data = geojson_bytes(collection)
    if gz:
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=6, mtime=0) as fh:
            fh.write(data)
        data = buf.getvalue()
    return atomic_write_bytes(target, data)


def read_geojson(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.geojson`` or ``.geojson.gz`` file (for tests and round trips)."""
    target = Path(path)
    raw = target.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    collection: dict[str, Any] = json.loads(raw.decode("utf-8"))
    return collection
