"""Prequential (test-then-learn) evaluation: the pure parts, with no broker.

Interactions are replayed in time order; for every interaction after a user's
warm-up, each method ranks the catalogue *before* it learns the interaction,
and the ranking is scored against the item the user actually chose next.
This module holds what does not need the running pipeline: the replay order,
the warm-up split, the waves of requests that may be asked together, the
HR@k / NDCG@k accumulators and the two in-process baselines (global
popularity and river's online matrix factorisation). ``bench.prequential``
drives the real workers with it.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.errors import ConfigError


@dataclass(frozen=True)
class Interaction:
    """One user-item event of the replay.

    position: index of the event in its user's sequence (0 = oldest)
    scored:   False for warm-up events (published, never asked about)
    """

    user_id: str
    item_id: str
    time: float
    position: int
    scored: bool


def warmup_length(length: int, fraction: float) -> int:
    """Events of a ``length``-long sequence published before any is scored.

    At least one, so that every scored request has some history; a user with
    a single event is therefore never scored.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"the warm-up fraction must be in [0, 1), got {fraction}")
    return min(length, max(1, math.floor(length * fraction)))


def select_users(user_ids: Sequence[str], count: int | None, seed: int) -> list[str]:
    """``count`` users drawn without replacement (all when None), in their original order."""
    if count is None or count >= len(user_ids):
        return list(user_ids)
    if count < 1:
        raise ConfigError(f"--users must be at least 1, got {count}")
    chosen = set(random.Random(seed).sample(range(len(user_ids)), count))
    return [user for n, user in enumerate(user_ids) if n in chosen]


def replay_order(
    sequences: Mapping[str, Sequence[str]],
    timestamps: Mapping[str, Sequence[float]] | None,
    warmup_fraction: float,
) -> list[Interaction]:
    """Every interaction once, in the order the replay publishes them.

    With timestamps: by time, ties broken by the users' order in ``sequences``
    and then by position (a user's own order is never changed). Without
    (S3-Rec files keep only each user's order): users take turns, one event
    each per round, in the order of ``sequences``; the round number stands in
    for the time.
    """
    events: list[tuple[float, int, int, Interaction]] = []
    for rank, (user_id, items) in enumerate(sequences.items()):
        warm = warmup_length(len(items), warmup_fraction)
        times = timestamps[user_id] if timestamps is not None else None
        if times is not None and len(times) != len(items):
            raise ConfigError(f"user {user_id}: {len(items)} items but {len(times)} timestamps")
        for position, item_id in enumerate(items):
            when = float(times[position]) if times is not None else float(position)
            events.append((when, rank, position,
                           Interaction(user_id, item_id, when, position, scored=position >= warm)))
    if timestamps is None:
        events.sort(key=lambda e: (e[2], e[1]))  # round (= position), then user turn
    else:
        events.sort(key=lambda e: (e[0], e[1], e[2]))
    return [interaction for *_, interaction in events]


def waves(interactions: Sequence[Interaction], max_scored: int = 32) -> Iterator[list[Interaction]]:
    """Consecutive slices of the replay whose scored requests can be asked together.

    Within a wave no scored event has an earlier event of the same user, so
    once everything published before the wave is applied, every scored user's
    history is complete; all requests of a wave see the same global state (the
    state at the wave's start). A wave holds at most ``max_scored`` scored events.
    """
    if max_scored < 1:
        raise ConfigError("max_scored must be at least 1")
    wave: list[Interaction] = []
    users_in_wave: set[str] = set()
    scored = 0
    for interaction in interactions:
        if interaction.scored and (interaction.user_id in users_in_wave or scored >= max_scored):
            yield wave
            wave, users_in_wave, scored = [], set(), 0
        wave.append(interaction)
        users_in_wave.add(interaction.user_id)
        scored += interaction.scored
    if wave:
        yield wave


@dataclass
class RankingScore:
    """HR@k and NDCG@k over a stream of (ranking, target) pairs, with the running HR curve.

    With one relevant item, NDCG@k is 1 / log2(rank + 2) for a hit at 0-based
    ``rank`` and 0 for a miss.
    """

    k: int = 10
    hits: int = 0
    gain: float = 0.0
    count: int = 0
    cumulative_hr: list[float] = field(default_factory=list)

    def update(self, ranked: Sequence[str], target: str) -> bool:
        top = list(ranked[: self.k])
        hit = target in top
        self.count += 1
        if hit:
            self.hits += 1
            self.gain += 1.0 / math.log2(top.index(target) + 2)
        self.cumulative_hr.append(self.hits / self.count)
        return hit

    @property
    def hit_rate(self) -> float:
        return self.hits / self.count if self.count else 0.0

    @property
    def ndcg(self) -> float:
        return self.gain / self.count if self.count else 0.0


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; ties by the lower index. ``scores``: (n_items,)."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    # The k-th score may be shared by items outside the partition; take them
    # all, then order by (score desc, index asc) so ties are deterministic.
    threshold = scores[candidates].min()
    tied = np.flatnonzero(scores >= threshold)
    order = np.lexsort((tied, -scores[tied]))
    return tied[order][:k]


class Catalogue:
    """The item ids every ranking is over, and their row numbers."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids = list(item_ids)
        self.index = {item_id: row for row, item_id in enumerate(self.item_ids)}
        if len(self.index) != len(self.item_ids):
            raise ConfigError("catalogue item ids must be unique")

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: Sequence[str] | set[str]) -> np.ndarray:
        return np.fromiter((self.index[i] for i in item_ids if i in self.index), dtype=np.int64)

    def rank(self, scores: np.ndarray, exclude: set[str], k: int) -> list[str]:
        """Top ``k`` item ids by ``scores`` (n_items,), leaving out ``exclude``."""
        masked = scores.astype(np.float64, copy=True)
        masked[self.rows(exclude)] = -np.inf
        return [self.item_ids[row] for row in _top_k(masked, k) if np.isfinite(masked[row])]


class PopularityBaseline:
    """Global interaction counts, updated online; ties go to the item listed first."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.counts = np.zeros(len(catalogue), dtype=np.float64)  # (n_items,)

    def learn_one(self, user_id: str, item_id: str) -> None:
        row = self.catalogue.index.get(item_id)
        if row is not None:
            self.counts[row] += 1.0

    def rank(self, user_id: str, exclude: set[str], k: int = 10) -> list[str]:
        return self.catalogue.rank(self.counts, exclude, k)


class RiverMF:
    """river's ``BiasedMF`` learning implicit feedback one event at a time.

    Each interaction is a positive (y = 1) followed by ``negatives`` items drawn
    uniformly from the catalogue as negatives (y = 0). Ranking reads the
    factors into numpy, because ``predict_one`` per catalogue item is far too
    slow: the item factors are mirrored in an (n_items, n_factors) matrix whose
    rows are refreshed after each update of that item. Items the model never
    saw score with zero bias and zero factors.
    """

    def __init__(self, catalogue: Catalogue, *, n_factors: int = 16, learning_rate: float = 0.05,
                 l2: float = 0.001, negatives: int = 3, seed: int = 7) -> None:
        from river import optim, reco

        self.catalogue = catalogue
        self.negatives = negatives
        self._rng = random.Random(seed)
        self.model = reco.BiasedMF(
            n_factors=n_factors,
            bias_optimizer=optim.SGD(learning_rate),
            latent_optimizer=optim.SGD(learning_rate),
            l2_bias=l2,
            l2_latent=l2,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
            seed=seed,
        )
        self.item_factors = np.zeros((len(catalogue), n_factors), dtype=np.float64)  # (n_items, f)
        self.item_bias = np.zeros(len(catalogue), dtype=np.float64)  # (n_items,)

    def learn_one(self, user_id: str, item_id: str) -> None:
        if item_id not in self.catalogue.index:
            return
        examples = [(item_id, 1.0)]
        for _ in range(self.negatives):
            negative = self.catalogue.item_ids[self._rng.randrange(len(self.catalogue))]
            if negative != item_id:
                examples.append((negative, 0.0))
        for item, label in examples:
            self.model.learn_one(user_id, item, label)
            row = self.catalogue.index[item]
            self.item_factors[row] = self.model.i_latents[item]
            self.item_bias[row] = self.model.i_biases[item]

    def scores(self, user_id: str) -> np.ndarray:
        """(n_items,) item bias + <user factors, item factors>; the user's own terms rank nothing."""
        if user_id not in self.model.u_latents:
            return self.item_bias.copy()
        user_factors = np.asarray(self.model.u_latents[user_id], dtype=np.float64)  # (f,)
        return self.item_bias + self.item_factors @ user_factors

    def rank(self, user_id: str, exclude: set[str], k: int = 10) -> list[str]:
        return self.catalogue.rank(self.scores(user_id), exclude, k)
