"""Answering a recommendation request: retrieve, score, re-rank, explain.

The same ``recommend`` serves the Kafka agent, the HTTP endpoint and search /
visual-search events, so every path returns the same ranking for the same state.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from core.events import RecommendedItem, RecRequest, RecResponse
from model.serving.contract import ITEM_PART, ServingModel, splits_scores
from model.serving.covisit import fused_relevance, ranked
from model.serving.rerank import mmr
from stream.covisit import fusion_weight
from stream.item_cache import Gathered
from stream.services import Services
from stream.store import SearchFilter, point_ids
from stream.user_table import TableUser
from stream.users import QUERY_PREFIX, UserState
from stream.versions import ServingState

TRENDING_CANDIDATES = 50
COVISIT_CANDIDATES = 50  # the best "chosen next" items a request considers
RETRIEVED = frozenset({"personal", "query", "image"})  # sources whose retrieval_score is a search score
COLD_SCAN = 2000  # catalogue items looked at when there is no signal at all
MMR_POOL = 50  # the best-scored candidates the diversity re-ranker chooses among
CANDIDATE_VECTORS = ["fused", "text", "image"]


@dataclass
class Candidate:
    item_id: str
    retrieval_score: float
    source: str  # "personal", "query", "image", "covisit", "trending" or "catalogue"


@dataclass
class _Pool:
    """A request's candidates as arrays: point ids, retrieval scores (0 where not searched), sources."""

    point_ids: np.ndarray  # (N,) int64, unique
    retrieval: np.ndarray  # (N,) float32
    sources: list[str]

    @classmethod
    def searched(cls, results: list[tuple[np.ndarray, np.ndarray, str]]) -> "_Pool":
        """Search results, best score per point when several searches found it."""
        if len(results) == 1:
            ids, scores, source = results[0]
            return cls(ids, scores, [source] * len(ids))
        best: dict[int, tuple[float, str]] = {}
        for ids, scores, source in results:
            for pid, score in zip(ids.tolist(), scores.tolist()):
                if pid not in best or best[pid][0] < score:
                    best[pid] = (score, source)
        return cls(np.fromiter(best, np.int64, len(best)),
                   np.asarray([v[0] for v in best.values()], np.float32), [v[1] for v in best.values()])

    def add(self, item_ids: list[str], source: str) -> None:
        """Append the items not in the pool yet, with retrieval score 0."""
        known = set(self.point_ids.tolist())
        fresh = [(pid, i) for pid, i in zip(point_ids(item_ids).tolist(), item_ids) if pid not in known]
        fresh = list({pid: i for pid, i in fresh}.items())
        if not fresh:
            return
        self.point_ids = np.concatenate([self.point_ids, np.asarray([f[0] for f in fresh], np.int64)])
        self.retrieval = np.concatenate([self.retrieval, np.zeros(len(fresh), np.float32)])
        self.sources.extend([source] * len(fresh))


class UserElsewhere(Exception):
    """The user state a request was given belongs to another model version than the one serving here."""


def recommend(
    services: Services,
    request: RecRequest,
    *,
    path: str,
    image_vector: np.ndarray | None = None,
    user: TableUser | None = None,
) -> RecResponse:
    """``user``: the user as the process that owns it applied it last (``stream.user_table``);
    by default the user is read from this process's store. ``UserElsewhere`` where that
    state is of another model version than this process serves."""
    started = time.perf_counter()
    # One read of the serving state: a hot swap during this request cannot mix versions.
    serving = services.serving
    settings, store, model = services.settings, services.store, serving.model
    split = splits_scores(model)
    query_vector = text_query = None
    if request.query:
        text_query = services.text_encoder.encode([request.query])[0]  # type: ignore[union-attr]
        query_vector = model.query_vectors(text_query[None, :])[0]
    # The user's state, trending and co-visits are read under one lock a click batch
    # publishes its in-memory effects under: a request sees a batch whole or not at all
    # (its stored user state first, never its trending or co-visits without it).
    with services.visibility.reading():
        if user is not None:
            if (user.collection, user.version) != (serving.collections.users, model.version) \
                    or (user.vector is not None and user.vector.shape != (model.fused_dim,)):
                raise UserElsewhere(f"user {request.user_id} is held for {user.version} ({user.collection}), "
                                    f"this process serves {model.version}")
            state = UserState(request.user_id, items=user.items, last_event_time=user.last_event_time)
            user_vector = user.vector
        else:
            users = store.retrieve(serving.collections.users, [request.user_id], with_vectors=True)
            hit = users.get(request.user_id)
            state = UserState.from_payload(request.user_id, hit.payload) if hit else UserState(request.user_id)
            user_vector = hit.vectors.get("user") if hit else None
        seen = {e for e in state.items if not e.startswith(QUERY_PREFIX)}
        excluded_set = seen | set(request.filters.exclude_ids)
        flt = SearchFilter(
            categories=tuple(request.filters.categories),
            # Point ids: the engine takes them as they are (no per-request id conversion).
            exclude_points=tuple(point_ids(list(excluded_set)).tolist()),
            max_price=request.filters.max_price,
        )

        # --- retrieval ---------------------------------------------------------
        t0 = time.perf_counter()
        limit = settings.candidates
        items = serving.collections.items
        searched: list[tuple[np.ndarray, np.ndarray, str]] = []
        if text_query is not None:
            searched.append((*store.search_points(items, "text", text_query, limit, flt), "query"))
        if image_vector is not None:
            searched.append((*store.search_points(items, "image", image_vector, limit, flt), "image"))
        if user_vector is not None and text_query is None and image_vector is None:
            searched.append((*store.search_points(items, "fused", user_vector, limit, flt), "personal"))
        pool = _Pool.searched(searched) if searched else _Pool(np.zeros(0, np.int64), np.zeros(0, np.float32), [])
        now = time.time()
        covisit_order: list[str] = []
        covisit_weight = fusion_weight(settings.covisit_weight, model)
        if covisit_weight > 0.0 and text_query is None and image_vector is None:
            covisit_order = _covisits(services, model, state, excluded_set)
            pool.add(covisit_order, "covisit")
        trending = services.trending.top_cached(TRENDING_CANDIDATES, now, exclude=excluded_set)
        pool.add([item_id for item_id, _ in trending], "trending")
        names = _vector_names(split, text_query is not None)
        gathered, kept = _gather(services, serving, pool, flt, names)
        if len(kept) < request.k and not (text_query is not None or image_vector is not None):
            # Too little signal (cold user, nothing trending that passes the
            # filters): fill up with catalogue items that pass them.
            scanned = [i for i in itertools.islice(store.scroll_ids(items), COLD_SCAN) if i not in excluded_set]
            pool.add(scanned, "catalogue")
            gathered, kept = _gather(services, serving, pool, flt, names)
        services.metrics.retrieval_latency.observe(time.perf_counter() - t0)
        if not gathered.item_ids:
            return _response(services, request, [], started, path, model.version)
        retrieval_scores = pool.retrieval[kept]
        sources = [pool.sources[n] for n in kept.tolist()]

        # --- scoring -------------------------------------------------------------
        t1 = time.perf_counter()
        fused = gathered.vectors["fused"]
        context = _context(services, model, gathered, retrieval_scores, state, now)
    personal = user_vector if user_vector is not None else (
        query_vector if query_vector is not None else np.zeros(model.fused_dim, np.float32)
    )
    if split:
        # The item-only part of the scorer was computed once per item (the cache's ITEM_PART column).
        scores = model.score_split(personal, text_query, fused, gathered.vectors[ITEM_PART],  # type: ignore[attr-defined]
                                   gathered.vectors.get("text"), context)
    else:
        scores = model.score(personal, text_query, fused, gathered.vectors["text"], gathered.vectors["image"],
                             context)
    services.metrics.scoring_latency.observe(time.perf_counter() - t1)

    # --- re-ranking and reasons ------------------------------------------------
    count = len(gathered.item_ids)
    k = min(request.k, settings.max_k, count)
    # Only search hits carry a retrieval score; other sources follow every search hit.
    retrieved = np.fromiter((source in RETRIEVED for source in sources), bool, count)
    retrieval = np.where(retrieved, retrieval_scores, -np.inf).astype(np.float32)
    covisit = _positions(gathered.point_ids, point_ids(covisit_order)) if covisit_order else []
    order = rerank(scores.astype(np.float32), fused, k, settings.diversity,
                   retrieval=retrieval, rank_pool=model.rank_pool,
                   covisit=covisit, covisit_weight=covisit_weight)
    # Explained as "chosen after" where the co-visit ranking put it higher than the model did.
    by_covisit: set[int] = set()
    if covisit and covisit_weight > 0.0:
        model_rank = np.empty(count, np.int64)
        model_rank[_model_order(scores, retrieval, model.rank_pool)] = np.arange(count)
        by_covisit = {n for rank, n in enumerate(covisit) if rank < model_rank[n]}
    explain = _Explainer(services, serving, state)
    chosen = []
    for i in order.tolist():
        candidate = Candidate(gathered.item_ids[i], float(retrieval_scores[i]), sources[i])
        chosen.append(RecommendedItem(
            item_id=candidate.item_id,
            score=round(float(scores[i]), 6),
            reason=explain.reason(candidate, fused[i], request.query, i in by_covisit),
            title=str(gathered.payloads[i].get("title") or ""),
        ))
    services.drift.update(scores=scores[order], user_vector=user_vector,
                          served=[item.item_id for item in chosen], impressions=len(chosen))
    return _response(services, request, chosen, started, path, model.version)


def _positions(haystack: np.ndarray, needles: np.ndarray) -> list[int]:
    """Positions in ``haystack`` (unique point ids) of each needle found there, in needle order."""
    sorter = np.argsort(haystack)
    at = np.searchsorted(haystack, needles, sorter=sorter).clip(max=len(haystack) - 1)
    positions = sorter[at]
    return positions[haystack[positions] == needles].tolist()


def _vector_names(split: bool, with_query: bool) -> list[str]:
    """The cached vectors a request copies out: what its scorer reads, and MMR's fused vectors."""
    if not split:
        return list(CANDIDATE_VECTORS)
    return ["fused", ITEM_PART] + (["text"] if with_query else [])


def rerank(scores: np.ndarray, fused: np.ndarray, k: int, trade_off: float, *,
           retrieval: np.ndarray | None = None, rank_pool: int | None = None,
           covisit: list[int] | None = None, covisit_weight: float = 0.0) -> np.ndarray:
    """Positions of the ``k`` candidates to answer with, best first: MMR over the best ``MMR_POOL``.

    MMR rescales relevance to [0, 1] over the candidates it is given; over all
    500 retrieved the top few sit within a hair of 1.0 and the similarity term
    decides alone (on MovieLens a 0.8 trade-off then lost a third of the hits).
    Over the best 50, as the quality bench's diversity sweep measures it, the
    trade-off means what that sweep shows.

    ``rank_pool`` (the model's, with each candidate's ``retrieval`` score):
    ``scores`` only order the ``rank_pool`` best candidates by retrieval, the
    pool a trained ranker learnt to re-order; candidates beyond it follow in
    retrieval order. A ranker's correction on candidates it never saw in
    training can lift far-down items over the retrieval top.

    ``covisit``: candidate positions in co-visit order (``model.serving.covisit``);
    with a positive ``covisit_weight`` the model's order and this one are fused
    by reciprocal rank, and MMR chooses by the fused relevance.
    """
    model_order = _model_order(scores, retrieval, rank_pool)
    if covisit and covisit_weight > 0.0:
        fusion = fused_relevance(model_order.tolist(), covisit, covisit_weight)
        relevance = np.asarray([fusion[n] for n in range(len(scores))], dtype=np.float32)
        return _mmr_over_best(relevance, fused, k, trade_off)
    if rank_pool is None or retrieval is None or len(scores) <= rank_pool:
        return _mmr_over_best(scores, fused, k, trade_off)
    ranked_pool, rest = model_order[:rank_pool], model_order[rank_pool:]
    head = ranked_pool[_mmr_over_best(scores[ranked_pool], fused[ranked_pool], min(k, rank_pool), trade_off)]
    return np.concatenate([head, rest[: k - len(head)]])


def _model_order(scores: np.ndarray, retrieval: np.ndarray | None, rank_pool: int | None) -> np.ndarray:
    """Every candidate position in the model's order: by score within the rank pool, then by retrieval."""
    if rank_pool is None or retrieval is None or len(scores) <= rank_pool:
        return np.argsort(-scores, kind="stable")
    by_retrieval = np.argsort(-retrieval, kind="stable")
    pool, rest = by_retrieval[:rank_pool], by_retrieval[rank_pool:]
    return np.concatenate([pool[np.argsort(-scores[pool], kind="stable")], rest])


def _covisits(services: Services, model: ServingModel, state: UserState, excluded: set[str]) -> list[str]:
    """The best items chosen after the user's latest ones, by the model's and the stream's transitions."""
    history = state.recent_items(services.covisit.window)
    if not history:
        return []
    scores = services.covisit.scores(history, model.transitions, model.item_index, model.item_ids)
    return ranked(scores, excluded | set(history), COVISIT_CANDIDATES)


def _mmr_over_best(scores: np.ndarray, fused: np.ndarray, k: int, trade_off: float) -> np.ndarray:
    pool = min(len(scores), max(MMR_POOL, k))
    best = np.argsort(-scores, kind="stable")[:pool]
    return best[mmr(scores[best], fused[best], k, trade_off)]


def _context(services: Services, model: ServingModel, gathered: Gathered, retrieval: np.ndarray,
             state: UserState, now: float) -> np.ndarray:
    """(N, 3) context features: log popularity, recency in days, retrieval score.

    A trained model defines them as its ranker was trained on them (training
    counts, days since the item's last training interaction at the time of the
    user's latest event); feeding it live trending counts or catalogue ages
    instead would put its ranker far outside what it learned. The rule scorer
    reads the live ones: decayed trending counts and days since the item was
    listed.
    """
    retrieval = np.asarray(retrieval, dtype=np.float32)
    own = model.context_features(gathered.item_ids, retrieval, state.last_event_time or now)
    if own is not None:
        return own
    created = np.array([float(p.get("created_at") or now) for p in gathered.payloads])
    return np.stack(
        [
            np.log1p(services.trending.scores(gathered.item_ids, now)),
            np.maximum(0.0, now - created) / 86400.0,
            retrieval,
        ],
        axis=1,
    ).astype(np.float32)


def _gather(services: Services, serving: ServingState, pool: _Pool, flt: SearchFilter,
            names: list[str]) -> tuple[Gathered, np.ndarray]:
    """Candidate rows from the item cache by point id, and their positions in ``pool``.

    Trending, co-visit and catalogue candidates were not found by a filtered
    search, so the filters are applied to them here; ids the store does not
    hold are left out.
    """
    gathered = serving.item_cache.gather_points(
        pool.point_ids,
        lambda missing: services.store.retrieve_points(serving.collections.items, missing,
                                                       with_vectors=CANDIDATE_VECTORS),
        names,
    )
    found = np.isin(pool.point_ids, gathered.point_ids, assume_unique=True)
    positions = np.flatnonzero(found)  # pool positions of the gathered rows, in order
    keep = [
        n for n, position in enumerate(positions.tolist())
        if pool.sources[position] in RETRIEVED or _passes(gathered.payloads[n], flt)
    ]
    if len(keep) == len(positions):
        return gathered, positions
    return gathered.subset(keep), positions[keep]


def _passes(payload: dict, flt: SearchFilter) -> bool:
    if flt.categories and payload.get("category") not in flt.categories:
        return False
    if flt.max_price is not None:
        price = payload.get("price")
        # An item without a price cannot be shown under a price cap (as the store's filter does).
        if price is None or price > flt.max_price:
            return False
    return True


def _response(services: Services, request: RecRequest, items: list[RecommendedItem],
              started: float, path: str, model_version: str) -> RecResponse:
    elapsed = time.perf_counter() - started
    services.metrics.request_latency.labels(path).observe(elapsed)
    return RecResponse(
        request_id=request.request_id,
        user_id=request.user_id,
        items=items,
        model_version=model_version,
        served_at=time.time(),
        latency_ms=round(elapsed * 1000, 3),
    )


class _Explainer:
    """Short reasons: the recent interaction an item is closest to, or its source."""

    def __init__(self, services: Services, serving: ServingState, state: UserState) -> None:
        recent = list(dict.fromkeys(e for e in reversed(state.items) if not e.startswith(QUERY_PREFIX)))[:10]
        found = serving.item_cache.gather(
            recent,
            lambda missing: services.store.retrieve(serving.collections.items, missing,
                                                    with_vectors=CANDIDATE_VECTORS),
            ["fused"],
        )
        self._titles = [str(p.get("title") or i) for i, p in zip(found.item_ids, found.payloads)]
        self._vectors = found.vectors["fused"]  # (R, fused_dim)

    def reason(self, candidate: Candidate, fused: np.ndarray, query: str | None, chosen_after: bool = False) -> str:
        if candidate.source == "query" and query:
            return f"matches your search '{query}'"
        if candidate.source == "image":
            return "looks like your photo"
        if candidate.source == "catalogue":
            return "from the catalogue (no activity yet to go on)"
        if (candidate.source == "covisit" or chosen_after) and self._titles:
            return f"often chosen after '{self._titles[0]}'"
        if candidate.source == "trending" or not self._titles:
            return "trending now"
        closest = int(np.argmax(self._vectors @ fused))
        return f"because you viewed '{self._titles[closest]}'"
