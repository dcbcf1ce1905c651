"""``streamrec bench sweep``: variants parsed strictly, every (variant, seed) trained and reported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.sweep import main, parse_variant
from core.errors import ConfigError


def test_a_variant_overrides_tower_and_training_fields_with_their_types() -> None:
    variant = parse_variant("wide:fused_dim=128,negatives=0,learning_rate=1e-3,dropout=0.3")
    assert variant.name == "wide"
    assert variant.tower == {"fused_dim": 128, "dropout": 0.3}
    assert variant.retrieval == {"negatives": 0, "learning_rate": 1e-3}


@pytest.mark.parametrize("text, message", [
    ("wide", "expected NAME:KEY=VALUE"),
    ("wide:colour=red", "unknown setting 'colour'"),
    ("wide:seed=3", "unknown setting 'seed'"),  # seeds come from --seeds
    ("wide:fused_dim=large", "fused_dim='large' is not a int"),
])
def test_a_bad_variant_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_variant(text)


def test_every_variant_and_seed_is_trained_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for user in range(40):  # users walk 12 items in order from a random start
        start = int(rng.integers(0, 12))
        lines.append(" ".join([str(user)] + [str((start + step) % 12 + 1) for step in range(6)]))
    data = tmp_path / "walk.txt"
    data.write_text("\n".join(lines) + "\n")
    jsonl = tmp_path / "runs.jsonl"
    code = main(["--data", str(data), "--variant", "small:fused_dim=8,epochs=2,fine_tune_epochs=1",
                 "--seeds", "1,2", "--minutes", "0.05", "--device", "cpu", "--workers", "2", "--jsonl", str(jsonl)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = [(run["variant"], run["seed"]) for run in summary["runs"]]
    assert runs == [("defaults", 1), ("defaults", 2), ("small", 1), ("small", 2)]
    assert len(jsonl.read_text().splitlines()) == 4
    small = summary["runs"][2]
    assert small["tower"] == {"fused_dim": 8} and small["epochs_run"] <= 2
    for run in summary["runs"]:
        assert 0.0 <= run["test"]["hr@10"] <= 1.0 and run["test"]["ndcg@10"] <= run["test"]["hr@10"]


def test_a_missing_data_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "absent.txt"), "--device", "cpu"]) == 2
    assert "no such file" in capsys.readouterr().err
