"""A trained model is served only over towers exported from the encoders it was trained with."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.errors import ModelLoadError
from model.export.towers import build_towers, encoder_identities
from stream.services import check_encoders


def model_with(encoders: dict) -> SimpleNamespace:
    return SimpleNamespace(version="v1", config={"encoders": encoders})


def towers(tmp_path: Path, text_fingerprint: str, image_fingerprint: str) -> Path:
    for kind, fingerprint in (("text", text_fingerprint), ("image", image_fingerprint)):
        (tmp_path / kind).mkdir(parents=True)
        (tmp_path / kind / f"{kind}_tower.json").write_text(
            json.dumps({"encoder": f"some-{kind}-encoder", "source_fingerprint": fingerprint}))
    return tmp_path


def test_the_recorded_identities_are_those_of_the_exported_towers(models_dir: Path) -> None:
    check_encoders(model_with(encoder_identities()), models_dir / "towers")


def test_another_text_encoder_is_refused_with_what_to_set(tmp_path: Path) -> None:
    folder = towers(tmp_path, "b" * 64, "c" * 64)
    model = model_with({"text": {"encoder": "my-encoder", "source_fingerprint": "a" * 64},
                        "image": {"encoder": "efficientnet-lite0", "source_fingerprint": "c" * 64}})
    with pytest.raises(ModelLoadError, match="STREAMREC_TEXT_ENCODER_PATH") as error:
        check_encoders(model, folder)
    assert "my-encoder" in str(error.value) and "some-text-encoder" in str(error.value)


def test_other_image_weights_are_refused(tmp_path: Path) -> None:
    folder = towers(tmp_path, "a" * 64, "d" * 64)
    model = model_with({"text": {"source_fingerprint": "a" * 64}, "image": {"source_fingerprint": "c" * 64}})
    with pytest.raises(ModelLoadError, match="STREAMREC_IMAGE_ENCODER_WEIGHTS"):
        check_encoders(model, folder)


def test_models_without_fingerprints_pass(tmp_path: Path) -> None:
    folder = towers(tmp_path, "a" * 64, "c" * 64)
    # The rule model's config records its kind and dimensions, no encoders.
    rule_config = {"kind": "rule", "version": "rule-3", "text_dim": 384, "image_dim": 1280}
    check_encoders(SimpleNamespace(version="rule-3", config=rule_config), folder)
    check_encoders(model_with({"text": "sentence-transformers/all-MiniLM-L6-v2"}), folder)


def test_missing_sidecar_says_to_run_setup(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="streamrec setup"):
        check_encoders(model_with({"text": {"source_fingerprint": "a" * 64}}), tmp_path)


def test_missing_image_weights_fail_the_export_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="image encoder weights not found"):
        build_towers(tmp_path, image_weights_path=tmp_path / "absent.pth")
