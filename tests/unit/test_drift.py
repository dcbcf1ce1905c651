"""Drift maths and the drift monitor on stationary and shifted synthetic streams."""
from __future__ import annotations

import numpy as np
import pytest

from exporter.drift import (
    DriftMonitor,
    ctr_ratio,
    dimension_psi,
    gini,
    mean_cosine_distance,
    psi,
)


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, 20_000)
    assert psi(reference, rng.normal(0.0, 1.0, 20_000)) < 0.01
    assert psi(reference, rng.normal(1.0, 1.0, 20_000)) > 0.25


def test_psi_stays_finite_when_the_current_window_fills_one_bin() -> None:
    reference = np.linspace(0.0, 1.0, 1000)
    value = psi(reference, np.full(100, 0.95))
    assert np.isfinite(value) and value > 1.0
    assert psi(np.zeros(0), reference) == 0.0


def test_embedding_shift_measures_the_mean_direction() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=64)
    reference = base + 0.1 * rng.normal(size=(500, 64))
    assert mean_cosine_distance(reference, base + 0.1 * rng.normal(size=(500, 64))) < 0.01
    assert mean_cosine_distance(reference, -base + 0.1 * rng.normal(size=(500, 64))) > 1.5
    assert dimension_psi(reference, reference + 1.0) > dimension_psi(reference, reference)


def test_ctr_ratio_and_its_empty_cases() -> None:
    assert ctr_ratio(10, 100, 5, 100) == pytest.approx(0.5)
    assert ctr_ratio(10, 100, 20, 100) == pytest.approx(2.0)
    assert ctr_ratio(0, 100, 5, 100) == 1.0
    assert ctr_ratio(10, 100, 0, 0) == 1.0


def test_gini_of_equal_and_concentrated_counts() -> None:
    assert gini(np.full(100, 7.0)) == pytest.approx(0.0)
    concentrated = np.zeros(100)
    concentrated[0] = 1000
    assert gini(concentrated) == pytest.approx(0.99)
    assert gini(np.zeros(5)) == 0.0


def _replay(monitor: DriftMonitor, rng: np.random.Generator, requests: int, *, shifted: bool,
            user_direction: np.ndarray) -> None:
    catalogue = [f"item-{i}" for i in range(400)]
    for _ in range(requests):
        if shifted:
            # Users now click one category: a few items, higher scores, vectors turned.
            served = list(rng.choice(catalogue[:20], size=10, replace=False))
            scores = rng.beta(8, 2, size=10)
            vector = -user_direction + 0.3 * rng.normal(size=user_direction.shape)
            clicks = int(rng.random() < 0.05)
        else:
            served = list(rng.choice(catalogue, size=10, replace=False))
            scores = rng.beta(2, 5, size=10)
            vector = user_direction + 0.3 * rng.normal(size=user_direction.shape)
            clicks = int(rng.random() < 0.3)
        monitor.update(scores=scores, user_vector=vector, served=served, clicks=clicks, impressions=1)


def test_monitor_alerts_on_a_shifted_stream_only() -> None:
    rng = np.random.default_rng(2)
    direction = rng.normal(size=32)
    stationary = DriftMonitor(reference_size=3000, window_size=3000)
    assert not stationary.results().reference_ready
    _replay(stationary, rng, 600, shifted=False, user_direction=direction)
    results = stationary.results()
    assert results.reference_ready
    assert results.alerts == ()
    assert results.score_psi < 0.1 and results.embedding_shift < 0.15

    shifted = DriftMonitor(reference_size=3000, window_size=3000)
    _replay(shifted, rng, 300, shifted=False, user_direction=direction)
    _replay(shifted, rng, 300, shifted=True, user_direction=direction)
    drifted = shifted.results()
    assert drifted.drift_detected
    assert {"score_psi", "embedding_shift", "ctr_ratio"} <= set(drifted.alerts)
    assert drifted.popularity_gini > stationary.results().popularity_gini

    shifted.reset()
    assert not shifted.results().drift_detected
