"""equiseg pretrain: both modes end to end on tiny real H&E, exact resume, the dense term's cell matching, the
shipped default model, rot90."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi.errors import InputError
from equiseg_wsi.features import FeatureExtractor, build_extractor
from equiseg_wsi.models.arch import DEFAULT_ARCH
from equiseg_wsi.models.resnet import ArchSpec
from equiseg_wsi.models.weights import default_weights, load_weights
from equiseg_wsi.options import ExtractorSpec
from equiseg_wsi.pretrain import (
    PretrainConfig,
    SlideViews,
    TrainingNet,
    cell_grid,
    dense_cosine,
    dense_nt_xent,
    hed_to_rgb,
    predict_tiles,
    pretrain,
    rgb_to_hed,
)
from equiseg_wsi.slide import Slide

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
CMU = ROOT / "sample_data" / "CMU-1-Small-Region.svs"
TINY = "8,16,32,64"


@pytest.fixture(scope="module")
def cmu_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600 x 600 px crop of the CC0 region's tissue (0.499 µm/px) as a PNG: tiny real ssl data."""
    from equiseg_wsi.slide import open_slide

    with open_slide(CMU) as s:
        rgb = s.read_region(700, 700, 600, 600, s.mpp)
    path = tmp_path_factory.mktemp("ssl") / "cmu_crop.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def class_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/<class>/*.png with real crops of two visually different tissues: skin (CC0) and colon (CC BY)."""
    from equiseg_wsi.slide import open_slide

    root = tmp_path_factory.mktemp("classes")
    (root / "colon").mkdir()
    (root / "skin").mkdir()
    crc = tifffile.imread(DATA / "CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif")[..., :3]
    for i, (y, x) in enumerate([(0, 0), (0, 112), (112, 0), (112, 112), (56, 56), (0, 56)]):
        Image.fromarray(np.ascontiguousarray(crc[y : y + 112, x : x + 112])).save(root / "colon" / f"c{i}.png")
    with open_slide(CMU) as s:
        for i, (x, y) in enumerate([(800, 800), (1000, 900), (1200, 1000), (900, 1300), (1300, 1400), (1100, 600)]):
            Image.fromarray(s.read_region(x, y, 224, 224, s.mpp)).save(root / "skin" / f"s{i}.png")
    return root


def _losses(path: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(path))]


def test_ssl_cli_end_to_end(cmu_crop: Path, tmp_path: Path) -> None:
    out = tmp_path / "ssl"
    res = CliRunner().invoke(cli, ["pretrain", "--mode", "ssl", str(cmu_crop), "--mpp", "0.499", "-o", str(out),
                                   "--widths", TINY, "--tile", "32", "--batch-size", "4", "--epochs", "2",
                                   "--steps-per-epoch", "2", "--device", "cpu", "--threads", "1",
                                   "--mpp-range", "1.0", "2.0", "--dense-weight", "0.5", "--border-prob", "0.5"])
    assert res.exit_code == 0, res.output
    for name in ("model.pt", "checkpoint.pt", "log.csv", "epochs.csv", "loss.png"):
        assert (out / name).is_file(), name
    assert len(_losses(out / "log.csv")) == 4
    loaded = load_weights(out / "model.pt")
    assert loaded.arch == replace(DEFAULT_ARCH, widths=(8, 16, 32, 64))  # the packaged layout, narrower
    assert loaded.normalization == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert loaded.training["options"]["mode"] == "ssl" and loaded.training["options"]["dense_weight"] == 0.5
    assert loaded.training["options"]["border_prob"] == 0.5
    assert "dense" in loaded.provenance["method"]
    assert all(np.isfinite(float(r["dense_loss"])) for r in csv.DictReader(open(out / "log.csv")))
    assert loaded.training["data"]["inputs"][0]["name"] == "cmu_crop.png"
    assert "mean_loss" in loaded.training["final_metrics"] and loaded.provenance["created_by"].startswith("equiseg")
    # the trained file works as --weights of the feature extractor
    ex = FeatureExtractor.from_weights(out / "model.pt", device="cpu")
    assert ex.extract(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 4, 4, 64)


def test_resume_gives_identical_losses(cmu_crop: Path, tmp_path: Path) -> None:
    cfg = PretrainConfig(widths=(8, 16, 32, 64), tile=32, batch_size=4, epochs=3, steps_per_epoch=2, seed=3,
                         dense_weight=1.0, border_prob=0.5)
    full = pretrain([cmu_crop], tmp_path / "full", cfg, device="cpu", mpp=0.499, threads=1)
    part = pretrain([cmu_crop], tmp_path / "part", cfg, device="cpu", mpp=0.499, threads=1, stop_after_epoch=1)
    assert not part.finished and not (tmp_path / "part" / "model.pt").exists()
    with pytest.raises(InputError, match="other options"):
        pretrain([cmu_crop], tmp_path / "part", PretrainConfig(**{**cfg.__dict__, "lr": 0.5}), device="cpu",
                 mpp=0.499, resume=True, threads=1)
    done = pretrain([cmu_crop], tmp_path / "part", cfg, device="cpu", mpp=0.499, threads=1, resume=True)
    assert done.finished
    assert _losses(tmp_path / "part" / "log.csv") == _losses(tmp_path / "full" / "log.csv")
    a, b = load_weights(full.weights).model.state_dict(), load_weights(done.weights).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    dense = [float(r["dense_loss"]) for r in csv.DictReader(open(tmp_path / "part" / "log.csv"))]
    assert len(dense) == 6 and all(np.isfinite(dense))  # the dense term was on in both halves


def test_dense_weight_zero_is_the_pooled_recipe(cmu_crop: Path, tmp_path: Path) -> None:
    """dense_weight 0 builds no dense head and logs no dense loss: the recipe before the dense term."""
    cfg = PretrainConfig(widths=(8, 16, 32, 64), tile=32, batch_size=4, epochs=1, steps_per_epoch=2, seed=3,
                         dense_weight=0.0)
    res = pretrain([cmu_crop], tmp_path / "o", cfg, device="cpu", mpp=0.499, threads=1)
    assert "dense_loss" not in open(res.log_csv).readline()
    assert load_weights(res.weights).training["options"]["dense_weight"] == 0.0
    assert TrainingNet(load_weights(res.weights).model, 16, ssl=True).dense_head is None
    with pytest.raises(InputError, match="dense_weight"):
        PretrainConfig(dense_weight=-1.0)
    # a checkpoint written before the dense term existed (no dense options) resumes as dense_weight 0
    two = PretrainConfig(**{**cfg.__dict__, "epochs": 2})
    pretrain([cmu_crop], tmp_path / "old", two, device="cpu", mpp=0.499, threads=1, stop_after_epoch=1)
    ck = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    del ck["config"]["dense_weight"], ck["config"]["dense_loss"]
    torch.save(ck, tmp_path / "old" / "checkpoint.pt")
    assert pretrain([cmu_crop], tmp_path / "old", two, device="cpu", mpp=0.499, threads=1, resume=True).finished


def test_cell_grid_pairs_cells_by_slide_position() -> None:
    # A: side 8 at (0, 0); B: side 8 at (4, 0); 2 x 2 cells of 4 px: A's right column is B's left column
    grid, inside = cell_grid(np.array([[0.0, 0.0, 8.0]]), np.array([[4.0, 0.0, 8.0]]), (2, 2))
    np.testing.assert_allclose(grid[0, :, 1, 0].numpy(), [-0.5, -0.5])  # x of B's left cell centre
    np.testing.assert_allclose(grid[0, :, 1, 1].numpy(), [-0.5, 0.5])  # same rows
    assert inside[0].tolist() == [[False, True], [False, True]]
    # twice the side (half the resolution): A's 2 x 2 cells fall in B's top-left quarter
    grid, inside = cell_grid(np.array([[0.0, 0.0, 8.0]]), np.array([[0.0, 0.0, 16.0]]), (2, 2))
    np.testing.assert_allclose(grid[0, 0, :, 0].numpy(), [-0.75, -0.25])
    assert inside.all()


def test_dense_matching_reproduces_views_of_a_real_slide_geometry() -> None:
    """Resampling B's cell map at A's cells gives A's cell map where both show the same place.

    On a linear intensity ramp, a cell's mean equals the ramp at the cell centre and bilinear resampling is
    exact, so views read by SlideViews at other shifts and scales must agree to rounding: this ties the
    matching to the real read geometry (top-left corner, side in level-0 px).
    """
    yy, xx = np.mgrid[0:600, 0:600].astype(np.float64)
    ramp = np.clip(np.rint(20 + 0.2 * xx + 0.1 * yy), 0, 255).astype(np.uint8)
    slide = Slide.from_array(np.repeat(ramp[..., None], 3, axis=2), mpp=0.5, name="ramp")
    cfg = PretrainConfig(tile=32, mpp_min=1.0, mpp_max=2.0, hed_sigma=0.0, brightness=0.0, contrast=0.0,
                         blur_prob=0.0, border_prob=0.0)
    views = SlideViews.__new__(SlideViews)
    views.cfg = cfg
    rng = np.random.default_rng(0)
    spot = type("Spot", (), {"slide": slide})()
    boxes_a, boxes_b, maps_a, maps_b = [], [], [], []
    for _ in range(6):
        a, box_a = views._view(spot, 300.0, 300.0, rng)
        b, box_b = views._view(spot, 300.0, 300.0, rng)
        boxes_a.append(box_a)
        boxes_b.append(box_b)
        for img, maps in ((a, maps_a), (b, maps_b)):
            maps.append(F.avg_pool2d(torch.from_numpy(img[..., 0].astype(np.float32))[None, None], 8)[0])
    ma, mb = torch.stack(maps_a), torch.stack(maps_b)
    grid, inside = cell_grid(np.array(boxes_a), np.array(boxes_b), (4, 4))
    b_at_a = F.grid_sample(mb, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # exact where A's cell centre lies between B's outer cell centres (no clamping at B's border)
    core = (grid.abs() <= 1 - 1 / 4).all(dim=-1)
    assert core.sum() >= 20
    np.testing.assert_allclose(b_at_a[:, 0][core].numpy(), ma[:, 0][core].numpy(), atol=1.5)
    assert inside[core].all()


def test_dense_nt_xent_prefers_the_matching_cell() -> None:
    torch.manual_seed(0)
    fb = torch.randn(3, 32, 4, 4)
    grid, inside = cell_grid(np.array([[0.0, 0.0, 8.0]] * 3), np.array([[0.0, 0.0, 8.0]] * 3), (4, 4))
    same = dense_nt_xent(fb.clone(), fb, grid, inside, 0.1)
    other = dense_nt_xent(torch.randn(3, 32, 4, 4), fb, grid, inside, 0.1)
    assert same < 0.1 < other
    assert float(dense_cosine(fb.clone(), fb, grid, inside)) == pytest.approx(0.0, abs=1e-6)
    assert float(dense_cosine(-fb, fb, grid, inside)) == pytest.approx(2.0, abs=1e-6)


def test_cosine_dense_term_end_to_end(cmu_crop: Path, tmp_path: Path) -> None:
    """The cosine variant trains on raw layer4 cells: no extra head, a finite dense loss, recorded options."""
    cfg = PretrainConfig(widths=(8, 16, 32, 64), tile=32, batch_size=4, epochs=1, steps_per_epoch=2, seed=3,
                         dense_weight=1.0, dense_loss="cosine")
    res = pretrain([cmu_crop], tmp_path / "o", cfg, device="cpu", mpp=0.499, threads=1)
    dense = [float(r["dense_loss"]) for r in csv.DictReader(open(res.log_csv))]
    assert len(dense) == 2 and all(0.0 <= d <= 2.0 for d in dense)
    loaded = load_weights(res.weights)
    assert loaded.training["options"]["dense_loss"] == "cosine" and "cosine" in loaded.provenance["method"]
    with pytest.raises(InputError, match="dense_loss"):
        PretrainConfig(dense_loss="l2")


def test_supervised_end_to_end_and_rot90_invariant_predictions(class_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "sup"
    res = CliRunner().invoke(cli, ["pretrain", "--mode", "supervised", str(class_root), "-o", str(out),
                                   "--widths", TINY, "--tile", "32", "--batch-size", "4", "--epochs", "3",
                                   "--device", "cpu", "--threads", "1", "--val-fraction", "0.34", "--lr", "0.003"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "epochs.csv")))
    assert len(rows) == 3 and {"val_acc", "val_acc_rot90", "val_acc_rot180", "val_acc_rot270"} <= set(rows[0])
    assert all(float(r["val_rot_agreement"]) == 1.0 for r in rows)
    loaded = load_weights(out / "model.pt")
    assert loaded.arch.num_classes == 2 and loaded.training["classes"] == ["colon", "skin"]
    assert loaded.training["data"]["val_tiles"] == {"colon": 2, "skin": 2}
    # any 90° multiple of any tile: same prediction (the SRE model is exactly rot90-equivariant)
    files = sorted(class_root.rglob("*.png"))
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.Resampling.BOX)) for f in files])
    base = predict_tiles(loaded.model, tiles)
    for k in (1, 2, 3):
        turned = np.ascontiguousarray(np.rot90(tiles, k, axes=(1, 2)))
        np.testing.assert_array_equal(predict_tiles(loaded.model, turned), base)
    # and with the logits, not only the argmax
    with torch.no_grad():
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = loaded.model(x)
        y90 = loaded.model(torch.rot90(x, 1, dims=(2, 3)))
    torch.testing.assert_close(y90, y, rtol=1e-4, atol=1e-4)


def test_supervised_needs_class_folders(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    with pytest.raises(InputError, match="class folders"):
        pretrain([tmp_path], tmp_path / "o", PretrainConfig(mode="supervised", widths=(8, 16, 32, 64)), device="cpu")


def _runs_touch_an_edge(mask: np.ndarray) -> bool:
    """Every row's True pixels form one run that touches the left or right edge (a half-plane's do)."""
    for row in mask:
        idx = np.flatnonzero(row)
        if len(idx) and not (idx[-1] - idx[0] + 1 == len(idx) and (idx[0] == 0 or idx[-1] == len(row) - 1)):
            return False
    return True


def test_border_augmentation_turns_a_half_plane_of_the_view_into_glass() -> None:
    tissue = np.full((400, 400, 3), (150, 60, 130), np.uint8)  # flat purple: every tissue pixel known
    slide = Slide.from_array(tissue, mpp=0.5, name="flat")
    views = SlideViews.__new__(SlideViews)
    spot = type("Spot", (), {"slide": slide})()
    plain = dict(tile=32, hed_sigma=0.0, brightness=0.0, contrast=0.0, blur_prob=0.0)
    views.cfg = PretrainConfig(**plain, border_prob=0.0)
    untouched, _ = views._view(spot, 200.0, 200.0, np.random.default_rng(0))
    assert (untouched == tissue[0, 0]).all()
    views.cfg = PretrainConfig(**plain, border_prob=1.0)
    shares = []
    for seed in range(20):
        view, _ = views._view(spot, 200.0, 200.0, np.random.default_rng(seed))
        glass = (view != tissue[0, 0]).any(axis=-1)
        assert (view[glass].min() >= 200) and (view[~glass] == tissue[0, 0]).all()
        assert _runs_touch_an_edge(glass) and _runs_touch_an_edge(glass.T)
        shares.append(glass.mean())
    assert 0.1 - 1 / 32 <= min(shares) and max(shares) <= 0.5 + 1 / 32 and np.ptp(shares) > 0.2


def test_border_prob_must_be_a_probability_and_defaults_to_off_for_old_files() -> None:
    with pytest.raises(InputError, match="border_prob"):
        PretrainConfig(border_prob=1.5)
    old = PretrainConfig().to_dict()
    del old["border_prob"]
    assert PretrainConfig.from_dict(old).border_prob == 0.0


def test_defaults_follow_the_packaged_recipe() -> None:
    """Issue 17: `pretrain`'s defaults are the packaged model's layout and jitter, and the border probability of
    the last self-supervised packaged model (0.5, not 0); files from before keep what they trained with."""
    from equiseg_wsi.training.masks import MaskTrainConfig

    cfg = PretrainConfig()
    assert cfg.arch_spec() == DEFAULT_ARCH
    assert cfg.border_prob == 0.5 and cfg.dense_weight == 0.0 and not cfg.rotate_augment
    shipped = MaskTrainConfig()
    assert (cfg.hed_sigma, cfg.brightness, cfg.contrast) == (shipped.hed_sigma, shipped.brightness, shipped.contrast)
    assert shipped.arch() == DEFAULT_ARCH
    old = cfg.to_dict()
    for key in ("stem_kernel", "kernel_sizes", "blocks", "border_prob"):
        del old[key]
    old["widths"] = [64, 128, 256, 512]
    restored = PretrainConfig.from_dict(old)
    assert restored.arch_spec() == ArchSpec() and restored.border_prob == 0.0  # the published SRE-ResNet-18
    # the command line says the same
    from equiseg_cli.pretrain import pretrain as command

    defaults = {p.name: p.default for p in command.params}
    assert defaults["layout"] == "compact" and defaults["widths"] is None and defaults["border_prob"] == 0.5
    with pytest.raises(InputError, match="widths"):
        PretrainConfig(widths=(8, 16, 32))


def test_resnet18_layout_from_the_command_line(cmu_crop: Path, tmp_path: Path) -> None:
    out = tmp_path / "r18"
    res = CliRunner().invoke(cli, ["pretrain", "--mode", "ssl", str(cmu_crop), "--mpp", "0.499", "-o", str(out),
                                   "--layout", "resnet18", "--widths", "4,8,8,8", "--tile", "32", "--batch-size", "2",
                                   "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", "--threads", "1",
                                   "-q"])
    assert res.exit_code == 0, res.output
    assert load_weights(out / "model.pt").arch == ArchSpec(widths=(4, 8, 8, 8))


def test_hed_round_trip() -> None:
    rgb = np.random.default_rng(0).integers(1, 256, (16, 16, 3)).astype(np.float64)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(rgb)), rgb, atol=1e-6)
    h, e, _ = rgb_to_hed(np.array([[60.0, 40.0, 140.0]]))[0]  # haematoxylin blue-purple
    h2, e2, _ = rgb_to_hed(np.array([[230.0, 120.0, 180.0]]))[0]  # eosin pink
    assert h > e and e2 > h2


def test_shipped_default_model_is_the_default() -> None:
    path = default_weights("sre")
    assert path.is_file() and path.stat().st_size < 20e6
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ex = FeatureExtractor.from_weights(None, device="cpu")
    assert ex.identity()["source"] == f"sha256:{digest}"
    identity = build_extractor(ExtractorSpec(None, device="cpu", target_mpp=2.5)).feature_identity.as_dict()
    assert identity["source"] == f"sha256:{digest}"
    random_identity = build_extractor(ExtractorSpec("random", device="cpu", target_mpp=2.5)).feature_identity.as_dict()
    assert random_identity["source"] == "random-init seed=0"
    explicit = FeatureExtractor.from_weights(None, random_init=True, device="cpu")
    assert explicit.identity()["source"] == "random-init seed=0"
    loaded = load_weights(path)
    assert loaded.arch == DEFAULT_ARCH and loaded.training["recipe"].startswith("dense mask supervision")
    assert "development cases" in loaded.provenance["data"]  # never the benchmark's validation cases
    card = (ROOT / "docs" / "model_card.md").read_text()
    assert digest in card and "default_sre.pt" in card and "scripts/train_default_model.py" in card
