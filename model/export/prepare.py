"""What ``streamrec setup`` (and ``streamrec worker`` on first start) exports before serving.

Torch is imported only when something has to be exported, so a worker whose
models are ready starts without it.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.settings import Settings
from model.serving.rule_model import RULE_VERSION


def prepare_towers(settings: Settings, *, check: bool = False) -> Path:
    """Export the frozen text and image towers to ONNX once; reuse afterwards.

    Workers skip the check when both towers are exported (importing torch and
    transformers takes seconds; checksums are verified on load anyway);
    ``streamrec setup`` passes ``check=True`` to re-export when sources changed.
    """
    towers_dir = settings.models_path / "towers"
    exported = all((towers_dir / name / f"{name}_tower.json").exists() for name in ("text", "image"))
    if check or not exported:
        from model.export.towers import build_towers

        build_towers(towers_dir, text_encoder_path=settings.text_encoder_path,
                     image_weights_path=settings.image_encoder_weights)
    return towers_dir


def prepare_rule_model(settings: Settings) -> Path:
    """Export the rule model's scorer unless the current one is there."""
    rule_dir = settings.models_path / "rule"
    config = rule_dir / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("version") != RULE_VERSION:
        from model.export.rule_scorer import build_rule_scorer

        build_rule_scorer(rule_dir)
    return rule_dir


def prepare_models(settings: Settings, *, check: bool = False) -> Path:
    """Both of the above; returns the towers folder."""
    prepare_rule_model(settings)
    return prepare_towers(settings, check=check)
