"""QuPath's GeoJSON import rules as a checker: every way a collection would fail or be misread.

Kept apart from building and writing so that any collection (ours, or a file from elsewhere) can be checked
against the same rules that ``qupath_feature`` follows when it builds features.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry import shape as shapely_shape
from shapely.geometry.base import BaseGeometry

__all__ = ["OBJECT_TYPES", "SNAP_GRID", "UUID_RE", "qupath_problems"]

#: Object types QuPath's GeoJSON import understands and keeps (``tmaCore`` is dropped on import: use .qptma).
OBJECT_TYPES = ("annotation", "detection", "tile", "cell")

#: QuPath (since 0.6) snaps every coordinate to this grid in px; one geometry made invalid by it fails the import.
SNAP_GRID = 0.01

#: Object ids QuPath accepts: hyphenated UUIDs.
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")



def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_finite_number(v: object) -> bool:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return False
    return math.isfinite(float(v))


def _geometry_problems(geom: object, where: str) -> list[str]:
    if not isinstance(geom, Mapping):
        return [f"{where}: geometry missing or not an object"]
    gtype = geom.get("type")
    if gtype not in ("Polygon", "MultiPolygon"):
        return [f"{where}: geometry type must be Polygon or MultiPolygon, got {gtype!r}"]
    try:
        g = _read_geometry(geom)
    except Exception as exc:  # malformed coordinates
        return [f"{where}: geometry cannot be read ({exc})"]
    if g.is_empty:
        return [f"{where}: geometry is empty"]
    coords = shapely.get_coordinates(g)
    if not np.isfinite(coords).all():
        return [f"{where}: geometry has non-finite coordinates"]
    if not g.is_valid:
        return [f"{where}: geometry invalid ({shapely.is_valid_reason(g)})"]
    snapped = shapely.set_precision(g, SNAP_GRID, mode="pointwise")
    if not np.array_equal(shapely.get_coordinates(snapped), coords) and not snapped.is_valid:
        return [f"{where}: geometry invalid after snapping to 0.01 px ({shapely.is_valid_reason(snapped)})"]
    return []


def _read_geometry(geom: Mapping[str, object]) -> BaseGeometry:
    """A Polygon / MultiPolygon mapping as shapely reads it, each ring converted by NumPy at once (shapely's
    `shape` converts every vertex in Python: 80 % of checking a core's file)."""
    coordinates = geom.get("coordinates")
    if not isinstance(coordinates, list):
        return shapely_shape(dict(geom))  # let shapely say what is wrong
    polygons = [coordinates] if geom["type"] == "Polygon" else coordinates
    parts: list[Polygon] = []
    for polygon in polygons:
        if not isinstance(polygon, list) or not polygon:
            return shapely_shape(dict(geom))
        rings: list[Any] = [shapely.linearrings(np.asarray(ring, dtype=np.float64)) for ring in polygon]
        parts.append(shapely.polygons(rings[0], holes=rings[1:] or None))
    if geom["type"] == "Polygon":
        return parts[0]
    return MultiPolygon(parts)


def _feature_problems(feat: object, where: str) -> list[str]:
    if not isinstance(feat, Mapping):
        return [f"{where}: not an object"]
    problems: list[str] = []
    if feat.get("type") != "Feature":
        problems.append(f"{where}: type must be 'Feature', got {feat.get('type')!r}")
    fid = feat.get("id")
    if not isinstance(fid, str) or not UUID_RE.match(fid):
        problems.append(f"{where}: id must be a hyphenated UUID string, got {fid!r}")
    problems += _geometry_problems(feat.get("geometry"), where)
    props = feat.get("properties")
    if not isinstance(props, Mapping):
        return problems + [f"{where}: properties missing or not an object"]
    otype = props.get("objectType")
    if otype is None:
        problems.append(f"{where}: properties.objectType missing")
    elif otype == "tmaCore":
        problems.append(f"{where}: properties.objectType 'tmaCore' is dropped by QuPath's import (use .qptma)")
    elif otype not in OBJECT_TYPES:
        problems.append(f"{where}: properties.objectType {otype!r} is not one of {OBJECT_TYPES}")
    if "type" in props:
        problems.append(f"{where}: properties.type must not be used (QuPath reads it as the object type)")
    if "name" in props and not isinstance(props["name"], str):
        problems.append(f"{where}: properties.name must be a string")
    if "isLocked" in props and not isinstance(props["isLocked"], bool):
        problems.append(f"{where}: properties.isLocked must be true or false")
    if "classification" in props:
        cls = props["classification"]
        if not isinstance(cls, Mapping):
            problems.append(f"{where}: properties.classification must be an object")
        else:
            cname = cls.get("name")
            if not isinstance(cname, str) or not cname:
                problems.append(f"{where}: classification.name missing or not a string")
            elif ":" in cname or "\n" in cname or "\r" in cname:
                problems.append(f"{where}: classification.name {cname!r} contains ':' or a newline")
            col = cls.get("color")
            if col is None:
                problems.append(f"{where}: classification.color missing (QuPath fails to parse the class)")
            elif not (isinstance(col, list) and len(col) == 3 and all(_is_int(c) and 0 <= c <= 255 for c in col)):
                problems.append(f"{where}: classification.color must be [r, g, b] integers 0-255, got {col!r}")
    if "measurements" in props:
        meas = props["measurements"]
        if not isinstance(meas, Mapping):
            problems.append(f"{where}: properties.measurements must be a flat object of numbers")
        else:
            for k, v in meas.items():
                if not isinstance(k, str):
                    problems.append(f"{where}: measurement name {k!r} is not a string")
                elif not _is_finite_number(v):
                    problems.append(f"{where}: measurement {k!r} must be a finite number, got {v!r}")
    if "metadata" in props:
        meta = props["metadata"]
        if not isinstance(meta, Mapping):
            problems.append(f"{where}: properties.metadata must be an object of strings")
        else:
            for k, v in meta.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    problems.append(f"{where}: metadata {k!r} must map a string to a string, got {v!r}")
    if "childObjects" in props:
        children = props["childObjects"]
        if not isinstance(children, list):
            problems.append(f"{where}: properties.childObjects must be a list of features")
        else:
            for i, child in enumerate(children):
                problems += _feature_problems(child, f"{where}.childObjects[{i}]")
    return problems


def qupath_problems(collection: object) -> list[str]:
    """Every way ``collection`` breaks QuPath's import rules; empty means QuPath will import it.

    Also flags duplicate ids (QuPath would keep both objects but the ids would no longer identify them).
    """
    if not isinstance(collection, Mapping):
        return ["top level: not a JSON object"]
    problems: list[str] = []
    if collection.get("type") != "FeatureCollection":
        problems.append(f"top level: type must be 'FeatureCollection', got {collection.get('type')!r}")
    feats = collection.get("features")
    if not isinstance(feats, list):
        return problems + ["top level: features must be a list"]
    for i, feat in enumerate(feats):
        problems += _feature_problems(feat, f"features[{i}]")
    seen: dict[str, str] = {}

    def walk(feat: object, where: str) -> None:
        if not isinstance(feat, Mapping):
            return
        fid = feat.get("id")
        if isinstance(fid, str):
            if fid in seen:
                problems.append(f"{where}: id {fid} already used by {seen[fid]}")
            else:
                seen[fid] = where
        props = feat.get("properties")
        children = props.get("childObjects") if isinstance(props, Mapping) else None
        if isinstance(children, list):
            for j, child in enumerate(children):
                walk(child, f"{where}.childObjects[{j}]")

    for i, feat in enumerate(feats):
        walk(feat, f"features[{i}]")
    return problems
