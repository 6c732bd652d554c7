"""QuPath GeoJSON: features follow QuPath's rules, the checker catches each broken rule, files are stable."""

from __future__ import annotations

import copy
import gzip
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Point, Polygon, box

from equiseg_wsi.errors import EquisegError
from equiseg_wsi.export.geojson import (
    OKABE_ITO,
    GeoJSONError,
    cluster_class_name,
    cluster_color,
    feature_collection,
    geojson_bytes,
    object_id,
    qupath_feature,
    qupath_problems,
    read_geojson,
    write_geojson,
)
from equiseg_wsi.polygons import GridPlacement, label_map_to_polygons, remove_small_segments, tissue_outline

DATA = Path(__file__).parent / "data"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def real_collection() -> dict[str, Any]:
    """A region outline with its cluster segments as children, from the real CC0 H&E crop."""
    rgb = np.asarray(Image.open(DATA / "cmu1_small_region_x4_crop256.png").convert("RGB"))
    grey = rgb.astype(np.float32).mean(axis=2)
    tissue = grey < 200
    t1, t2 = np.percentile(grey[tissue], [33, 66])
    labels = np.zeros(grey.shape, np.int32)
    labels[tissue] = 1 + (grey[tissue] >= t1).astype(np.int32) + (grey[tissue] >= t2).astype(np.int32)
    labels = remove_small_segments(labels, 16)
    placement = GridPlacement(812.5, 1033.25, 7.99)
    polys = label_map_to_polygons(labels, placement)
    outline = tissue_outline(labels, placement, polygons=polys)
    children = [
        qupath_feature(
            g,
            object_id=object_id("CMU-1", "region 1", cluster_class_name(k)),
            name=f"region 1 {cluster_class_name(k)}",
            class_name=cluster_class_name(k),
            color=cluster_color(k - 1),
            measurements={"Area µm^2": g.area * 0.25, "Fraction": float(g.area / outline.area), "Components": 3},
            metadata={"cluster": k, "slide": "CMU-1"},
        )
        for k, g in polys.items()
    ]
    region = qupath_feature(
        outline,
        object_id=object_id("CMU-1", "region 1"),
        name="region 1",
        locked=True,
        child_objects=children,
    )
    return feature_collection([region])


@pytest.fixture(scope="module")
def collection() -> dict[str, Any]:
    return real_collection()


def simple_feature(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"object_id": object_id("s", "r", kw.pop("n", 1)), "class_name": "Cluster 1"}
    args.update(kw)
    return qupath_feature(box(0, 0, 10.5, 20.25), **args)


# ---------------------------------------------------------------------------------------------- ids, colours


def test_object_id_is_deterministic_hyphenated_uuid() -> None:
    a = object_id("slide.svs", "A-1", "Cluster 2")
    assert a == object_id("slide.svs", "A-1", "Cluster 2")
    assert UUID_RE.match(a)
    assert uuid.UUID(a).version == 5
    assert a != object_id("slide.svs", "A-1", "Cluster 3")
    assert object_id("a/b", "c") != object_id("a", "b/c")
    with pytest.raises(ValueError):
        object_id()


def test_cluster_palette() -> None:
    assert [cluster_color(i) for i in range(8)] == list(OKABE_ITO)
    colours = [cluster_color(i) for i in range(40)]
    assert len(set(colours)) == 40
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colours)
    assert colours == [cluster_color(i) for i in range(40)]
    assert cluster_class_name(1) == "Cluster 1" and cluster_class_name(12) == "Cluster 12"
    with pytest.raises(ValueError):
        cluster_color(-1)
    with pytest.raises(ValueError):
        cluster_class_name(0)


# ------------------------------------------------------------------------------------------------ features


def test_feature_layout_follows_qupath() -> None:
    f = simple_feature(name="core A-1", measurements={"Area px": np.float64(2.5), "n": np.int64(3)}, metadata={"k": 3})
    assert list(f) == ["type", "id", "geometry", "properties"]
    props = f["properties"]
    assert props["objectType"] == "annotation"
    assert "type" not in props
    assert props["classification"] == {"name": "Cluster 1", "color": list(OKABE_ITO[0])}
    assert props["measurements"] == {"Area px": 2.5, "n": 3}
    assert props["metadata"] == {"k": "3"}
    assert props["isLocked"] is False
    assert f["geometry"]["type"] == "Polygon"
    assert qupath_problems(feature_collection([f])) == []


def test_class_without_colour_gets_a_stable_one() -> None:
    f = simple_feature(class_name="Stroma")
    g = simple_feature(class_name="Stroma")
    assert f["properties"]["classification"]["color"] == g["properties"]["classification"]["color"]
    assert len(f["properties"]["classification"]["color"]) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"measurements": {"a": float("nan")}},
        {"measurements": {"a": float("inf")}},
        {"measurements": {"a": True}},
        {"measurements": {"a": "1"}},
        {"class_name": "Tumor: grade 2"},
        {"class_name": "two\nlines"},
        {"color": (300, 0, 0)},
        {"color": (1.5, 0, 0)},
        {"object_id": "not-a-uuid"},
        {"object_type": "tmaCore"},
        {"metadata": {1: "x"}},
    ],
)
def test_feature_refuses_what_qupath_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        simple_feature(**kwargs)


def test_feature_refuses_non_polygons_and_invalid_geometry() -> None:
    oid = object_id("x")
    with pytest.raises(GeoJSONError):
        qupath_feature(Point(1, 2), object_id=oid)
    with pytest.raises(GeoJSONError):
        qupath_feature(Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]), object_id=oid)
    with pytest.raises(GeoJSONError):
        qupath_feature(Polygon(), object_id=oid)


def test_errors_are_project_errors_and_value_errors() -> None:
    assert issubclass(GeoJSONError, EquisegError) and issubclass(GeoJSONError, ValueError)


def test_real_collection_passes_qupath_rules(collection: dict[str, Any]) -> None:
    assert qupath_problems(collection) == []
    children = collection["features"][0]["properties"]["childObjects"]
    assert [c["properties"]["classification"]["name"] for c in children] == ["Cluster 1", "Cluster 2", "Cluster 3"]
    assert all(c["geometry"]["type"] == "MultiPolygon" for c in children)


# ------------------------------------------------------------------------------------ the checker, rule by rule


def _props(c: dict[str, Any]) -> dict[str, Any]:
    return c["features"][0]["properties"]


def _child(c: dict[str, Any]) -> dict[str, Any]:
    return _props(c)["childObjects"][0]


BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "not a collection": (lambda c: c.update(type="Feature"), "FeatureCollection"),
    "features not a list": (lambda c: c.update(features={}), "features must be a list"),
    "feature type": (lambda c: c["features"][0].update(type="feature"), "type must be 'Feature'"),
    "id missing": (lambda c: c["features"][0].pop("id"), "hyphenated UUID"),
    "id not hyphenated": (lambda c: c["features"][0].update(id=uuid.uuid4().hex), "hyphenated UUID"),
    "geometry missing": (lambda c: c["features"][0].pop("geometry"), "geometry missing"),
    "geometry point": (
        lambda c: c["features"][0].update(geometry={"type": "Point", "coordinates": [1, 2]}),
        "Polygon or MultiPolygon",
    ),
    "geometry bowtie": (
        lambda c: c["features"][0].update(
            geometry={"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
        ),
        "invalid",
    ),
    "geometry invalid only after snapping": (
        lambda c: c["features"][0].update(
            geometry={
                "type": "Polygon",
                "coordinates": [
                    [[0, 0], [10, 0], [10, 10], [5, 10], [5.001, 5], [4.999, 5], [5, 10.001], [0, 10], [0, 0]]
                ],
            }
        ),
        "after snapping",
    ),
    "objectType missing": (lambda c: _props(c).pop("objectType"), "objectType missing"),
    "objectType tmaCore": (lambda c: _props(c).update(objectType="tmaCore"), "tmaCore"),
    "properties.type": (lambda c: _props(c).update(type="annotation"), "properties.type"),
    "properties missing": (lambda c: c["features"][0].pop("properties"), "properties missing"),
    "class without colour": (lambda c: _child(c)["properties"]["classification"].pop("color"), "color missing"),
    "class without name": (lambda c: _child(c)["properties"]["classification"].pop("name"), "name missing"),
    "class name colon": (
        lambda c: _child(c)["properties"]["classification"].update(name="a:b"),
        "contains ':'",
    ),
    "class colour out of range": (
        lambda c: _child(c)["properties"]["classification"].update(color=[0, 0, 256]),
        "0-255",
    ),
    "class colour as hex": (
        lambda c: _child(c)["properties"]["classification"].update(color="#ff0000"),
        "0-255",
    ),
    "measurement NaN": (lambda c: _child(c)["properties"]["measurements"].update(x=float("nan")), "finite"),
    "measurement string": (lambda c: _child(c)["properties"]["measurements"].update(x="1.0"), "finite"),
    "measurements nested": (
        lambda c: _child(c)["properties"].update(measurements=[{"name": "a", "value": 1}]),
        "flat object",
    ),
    "metadata non-string": (lambda c: _child(c)["properties"]["metadata"].update(k=3), "string to a string"),
    "isLocked not bool": (lambda c: _props(c).update(isLocked="yes"), "isLocked"),
    "child broken": (lambda c: _child(c).update(id="x"), "childObjects[0]"),
    "duplicate id": (
        lambda c: _props(c)["childObjects"][1].update(id=_child(c)["id"]),
        "already used",
    ),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_checker_flags_each_broken_rule(collection: dict[str, Any], name: str) -> None:
    broken = copy.deepcopy(collection)
    mutate, expected = BREAKAGES[name]
    mutate(broken)
    problems = qupath_problems(broken)
    assert problems, name
    assert any(expected in p for p in problems), problems


def test_checker_on_non_object() -> None:
    assert qupath_problems([]) and qupath_problems(None)


# ----------------------------------------------------------------------------------------------------- files


def test_write_is_byte_identical_and_key_order_independent(tmp_path: Path, collection: dict[str, Any]) -> None:
    a = write_geojson(tmp_path / "a.geojson", collection)
    b = write_geojson(tmp_path / "b.geojson", copy.deepcopy(collection))
    assert a.read_bytes() == b.read_bytes()
    shuffled = copy.deepcopy(collection)
    feat = shuffled["features"][0]
    shuffled["features"][0] = {k: feat[k] for k in reversed(list(feat))}
    shuffled["features"][0]["properties"] = dict(reversed(list(feat["properties"].items())))
    c = write_geojson(tmp_path / "c.geojson", shuffled)
    assert c.read_bytes() == a.read_bytes()
    assert real_collection() == collection  # rebuilding from scratch gives the same objects
    assert write_geojson(tmp_path / "d.geojson", real_collection()).read_bytes() == a.read_bytes()


def test_written_file_reads_back_and_keeps_the_rules(tmp_path: Path, collection: dict[str, Any]) -> None:
    path = write_geojson(tmp_path / "slide.geojson", collection)
    back = json.loads(path.read_text(encoding="utf-8"))
    assert back == collection
    assert qupath_problems(back) == []
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\d\.\d{3,}", text.split('"measurements"')[0]), "coordinates beyond 0.01"
    assert "NaN" not in text and "Infinity" not in text
    assert text.startswith('{"type":"FeatureCollection","features":[\n') and text.endswith("]}\n")


def test_gz_round_trip_is_deterministic(tmp_path: Path, collection: dict[str, Any]) -> None:
    a = write_geojson(tmp_path / "a.geojson.gz", collection)
    b = write_geojson(tmp_path / "b.geojson.gz", collection)
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == geojson_bytes(collection)
    assert read_geojson(a) == collection


def test_list_of_features_is_accepted(tmp_path: Path) -> None:
    feats = [simple_feature(n=i) for i in range(3)]
    path = write_geojson(tmp_path / "x.geojson", feats)
    assert read_geojson(path) == feature_collection(feats)
    empty = write_geojson(tmp_path / "empty.geojson", [])
    assert read_geojson(empty) == {"type": "FeatureCollection", "features": []}


@pytest.mark.parametrize("name", ["out.json", "out.JSON", "out.json.gz", "out.txt", "out"])
def test_wrong_suffix_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(GeoJSONError, match="geojson"):
        write_geojson(tmp_path / name, [simple_feature()])
    assert list(tmp_path.iterdir()) == []


def test_rejected_collection_leaves_no_file(tmp_path: Path, collection: dict[str, Any]) -> None:
    path = write_geojson(tmp_path / "s.geojson", collection)
    before = path.read_bytes()
    broken = copy.deepcopy(collection)
    _props(broken)["type"] = "annotation"
    with pytest.raises(GeoJSONError, match="properties.type"):
        write_geojson(path, broken)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.geojson"]


def test_nan_measurement_cannot_be_written_even_unvalidated(tmp_path: Path) -> None:
    f = simple_feature()
    f["properties"]["measurements"] = {"x": float("nan")}
    with pytest.raises(ValueError):
        write_geojson(tmp_path / "n.geojson", [f], validate=False)
    assert list(tmp_path.iterdir()) == []
