"""The rotation protocol (DESIGN 3.6): metric code, rotation helpers, SRE exactness at 90° on a real core, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from equiseg_cli.main import cli
from equiseg_wsi.errors import InputError
from equiseg_wsi.robust_metrics import compare_labels
from equiseg_wsi.robustness import (
    is_quarter_turn,
    parse_angles,
    rotate_array,
)

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "sample_data" / "cores" / "slide001_core001.jpg"


def _blocky(n: int = 64, k: int = 3, seed: int = 0) -> np.ndarray:
    """A label map of large patches inside a disc (0 outside), like a segmented core."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, k + 1, size=(n // 8, n // 8))
    labels = np.kron(coarse, np.ones((8, 8), dtype=np.int64)).astype(np.int32)
    yy, xx = np.mgrid[:n, :n]
    labels[(yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 > (0.45 * n) ** 2] = 0
    return labels


# ------------------------------------------------------------------------------------------- metric proof


@pytest.mark.parametrize("angle", [90, 180, 270])
def test_segmentation_vs_itself_rotated_and_back_scores_one(angle: float) -> None:
    labels = _blocky()
    back = rotate_array(rotate_array(labels, angle, order=0, cval=0), -angle, order=0, cval=0)
    scores = compare_labels(labels, back)
    assert scores["pixel_agreement"] == 1.0
    assert scores["mean_dice"] == 1.0
    assert scores["adjusted_rand_index"] == 1.0


def test_off_grid_round_trip_is_close_to_one() -> None:
    labels = _blocky(128)
    back = rotate_array(rotate_array(labels, 30, order=0, cval=0), -30, order=0, cval=0)
    scores = compare_labels(labels, back)
    assert scores["pixel_agreement"] > 0.97 and scores["adjusted_rand_index"] > 0.9


def test_random_relabelling_scores_near_chance() -> None:
    labels = _blocky(256, k=3)
    rng = np.random.default_rng(1)
    noise = np.where(labels > 0, rng.integers(1, 4, size=labels.shape), 0).astype(np.int32)
    scores = compare_labels(labels, noise)
    assert abs(scores["pixel_agreement"] - 1 / 3) < 0.03
    assert abs(scores["mean_dice"] - 1 / 3) < 0.03
    assert abs(scores["adjusted_rand_index"]) < 0.02


def test_permuted_ids_keep_the_partition_but_not_the_agreement() -> None:
    labels = _blocky(128, k=3)
    permuted = np.array([0, 2, 3, 1], dtype=np.int32)[labels]
    scores = compare_labels(labels, permuted)
    assert scores["adjusted_rand_index"] == 1.0
    assert scores["pixel_agreement"] == 0.0


# ----------------------------------------------------------------------------------------- rotation helpers


def test_rotation_direction_matches_rot90() -> None:
    """The resampling path turns the same way as np.rot90, so images and labels rotate consistently."""
    a = np.random.default_rng(2).integers(0, 9, size=(16, 16)).astype(np.int32)
    inner = (slice(1, -1), slice(1, -1))  # border samples fall a hair outside the image at a near-90° angle
    assert np.array_equal(rotate_array(a, 89.9999, order=0, cval=0)[inner], np.rot90(a, 1)[inner])
    assert np.array_equal(rotate_array(a, -90.0001, order=0, cval=0)[inner], np.rot90(a, -1)[inner])
    rgb = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    turned = rotate_array(rgb, 180.0001, order=1, cval=255)
    assert np.abs(turned[inner].astype(int) - np.rot90(rgb, 2)[inner].astype(int)).max() <= 1


def test_parse_angles() -> None:
    assert parse_angles("0:360:30") == [float(a) for a in range(0, 360, 30)]
    assert parse_angles("45,90") == [0.0, 45.0, 90.0]
    assert parse_angles("90 0 450 -90") == [0.0, 90.0, 270.0]
    assert is_quarter_turn(270) and is_quarter_turn(-90) and not is_quarter_turn(45)
    for bad in ("", "a,b", "0:360:0", "10:0:5"):
        with pytest.raises(InputError):
            parse_angles(bad)


# ------------------------------------------------------------------------------------------ real core


@pytest.fixture(scope="module")
def sre_series():  # type: ignore[no-untyped-def]
    """SRE features on a real core at 5 µm/px, angles 0/90/180/270/30 (fast: a 128 px square)."""
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.options import RunOptions, SegmentOptions
    from equiseg_wsi.robustness import default_models, run_experiment

    sources = collect_inputs([CORE], mpp=0.499)
    sre = default_models(target_mpp=5.0, device="cpu")[:1]
    options = RunOptions(SegmentOptions(target_mpp=5.0))
    series, failures = run_experiment(sources, sre, options, [0, 90, 180, 270, 30])
    assert not failures
    return series[0]


def test_sre_is_exact_at_quarter_turns(sre_series) -> None:  # type: ignore[no-untyped-def]
    s = sre_series
    assert s.core.side % 8 == 0 and s.core.side >= np.hypot(*s.core.content[2:])
    for angle in (90, 180, 270):
        scores = s.at(angle).metrics
        assert scores["pixel_agreement"] == 1.0, (angle, scores)
        assert scores["n_shared"] == s.at(0).metrics["n_shared"]
    deltas = s.deltas()
    assert deltas["c1_fraction_max_abs_delta"] < 0.2  # the off-grid angle moves it a little


def test_sre_off_grid_is_measured(sre_series) -> None:  # type: ignore[no-untyped-def]
    a = sre_series.at(30)
    assert 0.3 < a.metrics["pixel_agreement"] <= 1.0
    assert a.labels.shape == a.labels_back.shape == sre_series.at(0).labels.shape


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "rb"
    result = CliRunner().invoke(cli, [
        "robustness", str(CORE), "--mpp", "0.499", "-o", str(out), "--angles", "0,45,90",
        "--target-mpp", "8", "--halo", "32", "--device", "cpu", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    for name in ("robustness.csv", "summary.csv", "by_angle.csv", "robustness.png", "worst_sre.png",
                 "worst_standard.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "robustness.csv")))
    assert {r["model"] for r in rows} == {"sre", "standard"}
    assert {float(r["angle_deg"]) for r in rows} == {0.0, 45.0, 90.0}
    sre90 = [r for r in rows if r["model"] == "sre" and r["angle_deg"] == "90.0" and r["metric"] == "pixel_agreement"]
    assert float(sre90[0]["value"]) >= 0.999
    summary = {(r["model"], r["statistic"], r["angles"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    assert ("standard", "mean_dice", "off-grid") in summary and ("sre", "cv:composition", "all") in summary
    label = summary[("standard", "mean_dice", "off-grid")]["model_label"]
    assert "standard" in label and ("random init" in label or "trained weights" in label)


def test_cli_rejects_bad_angles(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["robustness", str(CORE), "--mpp", "0.499", "-o", str(tmp_path / "x"),
                                      "--angles", "zero"])
    assert result.exit_code != 0
    assert "angles" in result.output and "Traceback" not in result.output


def test_glass_fill_and_colour_refinement_keep_quarter_turns_exact() -> None:
    """The glass fill and the border refinement rotate with the image: agreement 1 at 90°, 180°, 270°."""
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.options import RunOptions, SegmentOptions
    from equiseg_wsi.robustness import default_models, run_experiment

    sources = collect_inputs([CORE], mpp=0.499)
    sre = default_models(target_mpp=5.0, device="cpu")[:1]
    options = RunOptions(SegmentOptions(target_mpp=5.0, glass="fill", refine="colour"))
    series, failures = run_experiment(sources, sre, options, [0, 90, 180, 270])
    assert not failures
    s = series[0]
    assert s.cell_um == pytest.approx(5.0 * 8 / 24)  # refined: 3 fine px per network px
    for angle in (90, 180, 270):
        assert s.at(angle).metrics["pixel_agreement"] == 1.0, angle
