"""User state: the recent-interaction sequence and the user vector, kept in the store.

State lives in the ``users`` collection (vector = user vector, payload = the
sequence plus what has been applied), not in Faust tables: recovering a table
from its changelog depends on the broker's end offsets, which the embedded
broker reports wrongly. The store is written before the consumer offset is
committed, and every update is idempotent:

* ``applied`` maps ``topic/partition`` to the last offset applied for this user;
  a redelivered message (same or lower offset) is skipped, and
* ``recent_ids`` holds the last event ids, so a producer that sends the same
  event twice (new offset, same ``event_id``) is also applied once. They are
  stored as one newline-separated text (ids cannot contain whitespace): as a
  list of 256 strings they made up most of the cost of writing and reading a
  user (every element crosses into the store and back one by one).

Offsets only order one incarnation of a log. The embedded broker keeps its log
in memory, so after a broker restart a partition starts again at offset 0 and
the old offsets would hide every new event. ``applied_time`` keeps the newest
event time applied per ``topic/partition``: a message at an old offset is a
redelivery only if it is also no newer than that (a redelivered event was
applied, so its time cannot exceed it); a newer one comes from a new log and
is applied. ``applied_count`` counts applied events (for exactness checks).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from core.events import ClickEvent, SearchEvent
from model.serving.contract import ACTION_CODE
from model.serving.user_batches import user_vectors_by_length
from stream.kafka import Delivery
from stream.services import Services
from stream.store import Point

log = logging.getLogger(__name__)
QUERY_PREFIX = "q:"  # sequence entries that are searches point into the queries collection
USER_CHUNK = 64  # users per user-tower call when recomputing a batch's vectors
SHARE_CHUNK = 1024  # users read from the store and written to the shared user table at a time


@dataclass
class UserState:
    user_id: str
    items: list[str] = field(default_factory=list)  # oldest first
    actions: list[int] = field(default_factory=list)
    applied: dict[str, int] = field(default_factory=dict)
    recent_ids: list[str] = field(default_factory=list)
    last_event_time: float = 0.0
    applied_time: dict[str, float] = field(default_factory=dict)
    applied_count: int = 0

    @classmethod
    def from_payload(cls, user_id: str, payload: dict[str, object]) -> "UserState":
        return cls(
            user_id=user_id,
            items=list(payload.get("items", [])),  # type: ignore[arg-type]
            actions=list(payload.get("actions", [])),  # type: ignore[arg-type]
            applied=dict(payload.get("applied", {})),  # type: ignore[arg-type]
            recent_ids=_unpack_ids(payload.get("recent_ids", [])),
            last_event_time=float(payload.get("last_event_time", 0.0)),  # type: ignore[arg-type]
            applied_time=dict(payload.get("applied_time", {})),  # type: ignore[arg-type]
            applied_count=int(payload.get("applied_count", 0)),  # type: ignore[call-overload]
        )

    def payload(self) -> dict[str, object]:
        return {
            "items": self.items,
            "actions": self.actions,
            "applied": self.applied,
            "recent_ids": "\n".join(self.recent_ids),
            "last_event_time": self.last_event_time,
            "applied_time": self.applied_time,
            "applied_count": self.applied_count,
            "updated_at": time.time(),
        }

    def already_applied(self, delivery: Delivery[ClickEvent | SearchEvent]) -> bool:
        source = f"{delivery.topic}/{delivery.partition}"
        if delivery.event.event_id in self.recent_ids:
            return True
        # A state written before applied_time existed has no entry: offsets alone decide.
        newest = self.applied_time.get(source, float("inf"))
        return delivery.offset <= self.applied.get(source, -1) and delivery.event.event_time <= newest

    def recent_items(self, count: int) -> list[str]:
        """The user's last ``count`` items (searches left out), oldest first."""
        recent: list[str] = []
        for entry in reversed(self.items):
            if len(recent) == count:
                break
            if not entry.startswith(QUERY_PREFIX):
                recent.append(entry)
        return recent[::-1]

    def append(self, delivery: Delivery[ClickEvent | SearchEvent], entry: str, action: int,
               max_length: int, window: int) -> None:
        self.items.append(entry)
        self.actions.append(action)
        del self.items[:-max_length], self.actions[:-max_length]
        source = f"{delivery.topic}/{delivery.partition}"
        self.applied[source] = delivery.offset
        self.applied_time[source] = max(self.applied_time.get(source, 0.0), delivery.event.event_time)
        self.applied_count += 1
        if window:
            self.recent_ids.append(delivery.event.event_id)
            del self.recent_ids[:-window]
        self.last_event_time = max(self.last_event_time, delivery.event.event_time)


def _unpack_ids(stored: object) -> list[str]:
    """``recent_ids`` as stored: newline-separated text, or a list (states written before)."""
    if isinstance(stored, str):
        return stored.split("\n") if stored else []
    return list(stored)  # type: ignore[call-overload]


def load_users(services: Services, user_ids: list[str]) -> dict[str, UserState]:
    hits = services.store.retrieve(services.collections.users, user_ids)
    return {
        uid: UserState.from_payload(uid, hits[uid].payload) if uid in hits else UserState(uid)
        for uid in user_ids
    }


def apply_interactions(services: Services, deliveries: list[Delivery[ClickEvent | SearchEvent]]) -> int:
    """Apply clicks and searches in order; recompute each touched user's vector once.

    Returns the number of events applied (duplicates excluded).
    """
    settings = services.settings
    user_ids = list(dict.fromkeys(d.event.user_id for d in deliveries))
    states = load_users(services, user_ids)
    searches = [d for d in deliveries if isinstance(d.event, SearchEvent)]
    query_vectors = _store_queries(services, searches, states)
    touched: set[str] = set()
    applied = 0
    learnt = services.signals.lesson(time.time())
    for delivery in deliveries:
        state = states[delivery.event.user_id]
        if state.already_applied(delivery):
            kind = "clicks" if isinstance(delivery.event, ClickEvent) else "searches"
            services.metrics.events_duplicate.labels(kind).inc()
            continue
        event = delivery.event
        if isinstance(event, ClickEvent):
            entry, action = event.item_id, ACTION_CODE[event.action]
            learnt.add_click(delivery, state.recent_items(services.covisit.window))  # type: ignore[arg-type]
        else:
            entry, action = QUERY_PREFIX + event.event_id, ACTION_CODE["search"]
        state.append(delivery, entry, action, settings.user_sequence_length, settings.dedup_window)
        touched.add(state.user_id)
        applied += 1
    if touched:
        changed = [states[uid] for uid in user_ids if uid in touched]
        vectors = user_vectors(services, changed, query_vectors)
        has_vector = vectors.any(axis=1)
        # The batch's trending and co-visits are logged before its users are
        # stored and published in memory after (stream.signals): a request that
        # sees them also sees what each user just did, a crash in between
        # learns them once, and a batch whose users could not be stored has
        # taught the signals nothing.
        with services.signals.learning(learnt):
            services.store.upsert(
                services.collections.users,
                # A user whose interactions are all with items not yet in the
                # catalogue has no vector yet (only the sequence) and is served as cold.
                [Point(s.user_id, {"user": v} if has else {}, s.payload())
                 for s, v, has in zip(changed, vectors, has_vector)],
            )
            if services.user_table is not None:  # the other processes answer these users from here
                _share(services, changed, vectors, has_vector)
        if learnt.clicked_lists:
            services.drift.update(clicks=learnt.clicked_lists)
        finished = time.time()
        for state in changed:
            services.metrics.freshness.observe(max(0.0, finished - state.last_event_time))
    return applied


def _share(services: Services, states: list[UserState], vectors: np.ndarray, has_vector: np.ndarray) -> None:
    """Write the batch's users to this process's shared user table (``stream.user_table``)."""
    table = services.user_table
    assert table is not None
    serving = services.serving
    try:
        refused = table.publish(serving.collections.users, serving.model.version, states, vectors, has_vector)
    except Exception:  # the batch is stored; the table only saves its readers a hop
        # Some of these users may now be older in the table than in the store: empty it,
        # and the other processes pass their requests on until the users are written again.
        log.exception("writing %d users to the shared user table failed; emptied it", len(states))
        table.clear()
        services.metrics.user_table_refused.labels("error").inc(len(states))
        services.metrics.user_table_users.set(table.users)
        return
    for reason, count in refused.items():
        if count:
            services.metrics.user_table_refused.labels(reason).inc(count)
    services.metrics.user_table_users.set(table.users)


def share_users(services: Services, user_ids: list[str]) -> None:
    """Write ``user_ids`` to this process's shared user table as its store holds them now.

    The caller is the table's one writer: at start-up before any batch, else under ``services.write_lock``.
    """
    users = services.collections.users
    hits = services.store.retrieve(users, user_ids, with_vectors=["user"])
    states = [UserState.from_payload(uid, hit.payload) for uid, hit in hits.items()]
    vectors = [hit.vectors.get("user") for hit in hits.values()]
    dim = services.model.fused_dim
    matrix = np.stack([np.zeros(dim, np.float32) if v is None else np.asarray(v, np.float32) for v in vectors]) \
        if vectors else np.zeros((0, dim), np.float32)
    _share(services, states, matrix, np.array([v is not None for v in vectors], bool))


def share_stored_users(services: Services, chunk: int = SHARE_CHUNK) -> int:
    """Write every user this process holds in its store to its (emptied) shared user table, until the
    table is full: at start-up, so that the other processes answer them from the first request.
    Returns how many it wrote."""
    table = services.user_table
    if table is None:
        return 0
    ids = services.store.scroll_ids(services.collections.users)
    while batch := list(itertools.islice(ids, chunk)):
        share_users(services, batch)
        if table.users >= table.capacity:
            break
    return table.users


def _store_queries(services: Services, searches: list[Delivery[SearchEvent]],
                   states: dict[str, UserState]) -> dict[str, np.ndarray]:
    """Embed new search queries once and keep their item-space vectors by entry id."""
    fresh = [d for d in searches if not states[d.event.user_id].already_applied(d)]
    if not fresh:
        return {}
    text = services.text_encoder.encode([d.event.query for d in fresh])  # type: ignore[union-attr]
    vectors = services.model.query_vectors(text)
    entries = {QUERY_PREFIX + d.event.event_id: v for d, v in zip(fresh, vectors)}
    services.store.upsert(
        services.collections.queries,
        [Point(entry, {"fused": v}, {"query": d.event.query, "user_id": d.event.user_id})  # type: ignore[union-attr]
         for (entry, v), d in zip(entries.items(), fresh)],
    )
    return entries


def user_vectors(services: Services, states: list[UserState], known: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """One model call for all ``states``: (B, fused_dim).

    Item vectors come from the serving state's item cache, which reads a
    missing item from the store once (all its vectors, as requests need them);
    reading every sequence's items from the store on every batch cost more
    than the rest of a click batch. Query vectors come from ``known`` or the store.
    """
    serving = services.serving
    model = serving.model
    length = min(model.max_sequence, services.settings.user_sequence_length)
    recents = [(s.items[-length:], s.actions[-length:]) for s in states]
    entries = list(dict.fromkeys(e for items, _ in recents for e in items))
    queries = dict(known or {})
    query_ids = [e for e in entries if e.startswith(QUERY_PREFIX) and e not in queries]
    if query_ids:
        hits = services.store.retrieve(serving.collections.queries, query_ids, with_vectors=["fused"])
        queries.update({k: h.vectors["fused"] for k, h in hits.items() if "fused" in h.vectors})
    cache = serving.item_cache
    gathered = cache.gather(
        [e for e in entries if not e.startswith(QUERY_PREFIX) and e not in queries],
        lambda missing: services.store.retrieve(serving.collections.items, missing, with_vectors=list(cache.dims)),
        ["fused"],  # the user tower reads item vectors only: no text or photo rows copied
    )
    with_fused = gathered.present["fused"]
    found = [i for i, present in zip(gathered.item_ids, with_fused) if present] + list(queries)
    # Row 0 stays zero: the padding, and where an item is not (yet) in the catalogue.
    table = np.zeros((1 + len(found), model.fused_dim), np.float32)  # (1 + E, d)
    table[1:1 + int(with_fused.sum())] = gathered.vectors["fused"][with_fused]
    for n, vector in enumerate(queries.values(), start=1 + int(with_fused.sum())):
        table[n] = vector
    row_of = {entry: n for n, entry in enumerate(found, start=1)}
    rows = np.zeros((len(states), length), np.int64)  # (B, L), left-padded
    actions = np.zeros((len(states), length), np.int64)  # (B, L), 0 = padding
    for b, (items, codes) in enumerate(recents):
        offset = length - len(items)
        for pos, (entry, action) in enumerate(zip(items, codes), start=offset):
            row = row_of.get(entry, 0)
            if row:
                rows[b, pos] = row
                actions[b, pos] = action
    # A few users at a time (table[rows] for a whole batch is (B, L, d), tens of
    # MB that cost more to build than the model spends on them), sorted by
    # length so that each call runs only as long as its longest sequence.
    return user_vectors_by_length(model, table, rows, actions, USER_CHUNK)
