"""Issue 17, build 8: `equiseg robustness` by default compares the model `equiseg run` uses (the packaged
weights) with the packaged standard-convolution twin, and says so; an untrained pair is labelled as such."""

from __future__ import annotations

import pytest

from equiseg_wsi.features import build_extractor
from equiseg_wsi.models import weights
from equiseg_wsi.models.weights import default_weights
from equiseg_wsi.options import ExtractorSpec
from equiseg_wsi.robustness import default_models


def test_default_pair_is_the_run_model_and_the_packaged_twin() -> None:
    sre, twin = default_models(device="cpu")
    run_model = build_extractor(ExtractorSpec(device="cpu")).feature_identity  # what `equiseg run` uses
    assert sre.extractor.feature_identity.as_dict() == run_model.as_dict()
    assert run_model.source == f"sha256:{weights._sha256_file(default_weights('sre'))}"
    twin_identity = twin.extractor.feature_identity
    assert twin_identity.kind == "standard"
    assert twin_identity.source == f"sha256:{weights._sha256_file(default_weights('standard'))}"
    assert "packaged trained weights" in sre.label and "packaged trained weights" in twin.label
    assert "untrained" not in sre.label + twin.label


def test_a_missing_twin_makes_both_untrained_and_the_labels_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import equiseg_wsi.robustness as robustness

    monkeypatch.setattr(robustness, "has_default_weights", lambda kind="sre": kind == "sre")
    pair = default_models(device="cpu")
    for model in pair:
        assert model.extractor.feature_identity.source.startswith("random-init")
        assert "untrained; the packaged standard weights are not installed" in model.label
