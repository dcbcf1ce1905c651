"""Drift of what the serving model sees and does, against a reference window.

Pure functions over arrays, plus ``DriftMonitor``: ``update(...)`` with what
one request (or one batch of events) produced, ``results()`` for read-only
numbers. The reference window is the first ``reference_size`` observations
after a model is loaded (its behaviour at promotion time); the current window
is the newest ``window_size`` observations.

Measures (the gauges ``streamrec_drift_*`` and the alert rules use the same):

- ``score_psi``: population stability index of ranking scores,
- ``embedding_shift``: mean over dimensions of the PSI of user-vector coordinates
  (robust where user vectors point every way and their mean is near zero),
- ``ctr_ratio``: current click-through rate / reference click-through rate,
- ``popularity_gini``: Gini coefficient of how often each item was served.
"""
from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

PSI_BINS = 10
# Empty bins would make PSI infinite; a small floor keeps it finite and
# comparable (the usual practice for PSI).
PSI_FLOOR = 1e-4


def psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``current`` against ``reference`` (1-D samples).

    Bins are the reference's quantiles, so each holds ~1/bins of it. 0 means
    the same distribution; > 0.25 is commonly read as a significant shift.
    """
    reference = np.asarray(reference, dtype=np.float64).ravel()
    current = np.asarray(current, dtype=np.float64).ravel()
    if len(reference) == 0 or len(current) == 0:
        return 0.0
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    expected_share = np.maximum(expected / len(reference), PSI_FLOOR)
    actual_share = np.maximum(actual / len(current), PSI_FLOOR)
    return float(np.sum((actual_share - expected_share) * np.log(actual_share / expected_share)))


def mean_cosine_distance(reference: np.ndarray, current: np.ndarray) -> float:
    """1 - cos(mean(reference), mean(current)) for (N, d) and (M, d) vectors; 0 when either is empty."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if reference.size == 0 or current.size == 0:
        return 0.0
    a, b = reference.reshape(-1, reference.shape[-1]).mean(axis=0), current.reshape(-1, current.shape[-1]).mean(axis=0)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0.0:
        return 0.0
    return float(1.0 - np.dot(a, b) / norms)


def dimension_psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """Mean per-dimension PSI of (N, d) against (M, d) vectors (a finer embedding-shift view)."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if reference.size == 0 or current.size == 0:
        return 0.0
    return float(np.mean([psi(reference[:, j], current[:, j], bins) for j in range(reference.shape[1])]))


def ctr_ratio(reference_clicks: float, reference_impressions: float,
              current_clicks: float, current_impressions: float) -> float:
    """Current CTR / reference CTR; 1.0 when either window has no impressions or no reference clicks."""
    if reference_impressions <= 0 or current_impressions <= 0 or reference_clicks <= 0:
        return 1.0
    return float((current_clicks / current_impressions) / (reference_clicks / reference_impressions))


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 = all equal, -> 1 = all on one item."""
    values = np.sort(np.asarray(counts, dtype=np.float64).ravel())
    total = values.sum()
    if len(values) == 0 or total <= 0:
        return 0.0
    n = len(values)
    ranks = np.arange(1, n + 1)
    return float((2.0 * np.sum(ranks * values)) / (n * total) - (n + 1.0) / n)


@dataclass(frozen=True)
class DriftThresholds:
    """Alert when a measure crosses its threshold (same values as the alert rules)."""

    score_psi: float = 0.25
    embedding_shift: float = 0.2
    ctr_ratio_min: float = 0.8
    popularity_gini: float = 0.9


@dataclass(frozen=True)
class DriftResults:
    score_psi: float
    embedding_shift: float
    ctr_ratio: float
    popularity_gini: float
    reference_ready: bool
    alerts: tuple[str, ...]

    @property
    def drift_detected(self) -> bool:
        return bool(self.alerts)


class _Window:
    """One window of observations: scores, user vectors, clicks/impressions, served items."""

    def __init__(self, size: int | None) -> None:
        self.scores: deque[float] = deque(maxlen=size)
        self.vectors: deque[np.ndarray] = deque(maxlen=size)
        self.served: deque[str] = deque(maxlen=size)
        self.outcomes: deque[tuple[int, int]] = deque(maxlen=size)  # (clicks, impressions)

    def add(self, scores: np.ndarray, vector: np.ndarray | None, served: list[str], clicks: int,
            impressions: int, room: int | None = None) -> None:
        take = len(scores) if room is None else min(room, len(scores))
        self.scores.extend(np.asarray(scores, dtype=np.float64)[:take].tolist())
        if vector is not None:
            self.vectors.append(np.asarray(vector, dtype=np.float32))
        self.served.extend(served[: take if room is not None else len(served)])
        if clicks or impressions:
            self.outcomes.append((clicks, impressions))

    def ctr_counts(self) -> tuple[int, int]:
        return sum(c for c, _ in self.outcomes), sum(i for _, i in self.outcomes)


class DriftMonitor:
    """Reference window (frozen once full) vs a sliding current window.

    ``update`` takes what one request or event batch produced; call
    ``reset`` when the serving model changes, so the reference is its own.
    """

    def __init__(self, reference_size: int = 5000, window_size: int = 5000,
                 thresholds: DriftThresholds = DriftThresholds()) -> None:
        self.reference_size = reference_size
        self.window_size = window_size
        self.thresholds = thresholds
        # Requests update from worker threads while a timer reads the results.
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._reference = _Window(None)
            self._current = _Window(self.window_size)

    @property
    def reference_ready(self) -> bool:
        return len(self._reference.scores) >= self.reference_size

    def update(self, scores: np.ndarray | None = None, user_vector: np.ndarray | None = None,
               served: list[str] | None = None, clicks: int = 0, impressions: int = 0) -> None:
        """One observation: the scores of the served list, the user's vector, the
        served item ids, and clicks / impressions counted since the last update."""
        scores = np.zeros(0) if scores is None else np.asarray(scores).ravel()
        served = served or []
        with self._lock:
            if not self.reference_ready:
                room = self.reference_size - len(self._reference.scores)
                self._reference.add(scores, user_vector, served, clicks, impressions,
                                    room=room if len(scores) else None)
                return
            self._current.add(scores, user_vector, served, clicks, impressions)

    def results(self) -> DriftResults:
        with self._lock:
            return self._results()

    def _results(self) -> DriftResults:
        ref, cur = self._reference, self._current
        ready = self.reference_ready and len(cur.scores) > 0
        if not ready:
            return DriftResults(0.0, 0.0, 1.0, 0.0, self.reference_ready, ())
        score_drift = psi(np.asarray(ref.scores), np.asarray(cur.scores))
        shift = dimension_psi(np.asarray(ref.vectors), np.asarray(cur.vectors)) if ref.vectors and cur.vectors else 0.0
        ratio = ctr_ratio(*ref.ctr_counts(), *cur.ctr_counts())
        # Items the reference served but the current window does not count as
        # zeros: serving fewer distinct items is exactly what concentration means.
        served = Counter({item_id: 0 for item_id in ref.served})
        served.update(cur.served)
        concentration = gini(np.asarray(list(served.values()), dtype=np.float64))
        limits, alerts = self.thresholds, []
        if score_drift > limits.score_psi:
            alerts.append("score_psi")
        if shift > limits.embedding_shift:
            alerts.append("embedding_shift")
        if ratio < limits.ctr_ratio_min:
            alerts.append("ctr_ratio")
        if concentration > limits.popularity_gini:
            alerts.append("popularity_gini")
        return DriftResults(score_drift, shift, ratio, concentration, True, tuple(alerts))
