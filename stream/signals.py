"""Trending and the stream's co-visits, logged in the store so that a restarted worker holds what it held.

Both live in the worker's memory (``stream.trending``, ``stream.covisit``) and
are learnt from the click stream. Every change to them is also written to a
log in the vector store, collection ``<collection_prefix>signals`` (payload-only
points, one collection whatever model version serves), with the discipline of
user state: store first, consumer offsets after. ``Services.open`` replays the
log, so a restarted worker starts with the trending scores, co-visit rows and
totals an uninterrupted one holds: the same operations, in the same order, at
the same logged times.

**A click batch** that teaches anything is one log entry ``log:<seq>``: its
trending adds (all at the batch's wall time) and its transitions, in order,
and, per source ``topic/partition``, the newest offset and event time whose
signals it learnt (its *position*). Per batch, in this order:

1. the entry is written;
2. the batch's users are stored (``stream.users``);
3. the batch is published in memory, under the lock requests read under;
4. the consumer commits the offsets (later).

A crash before 1 leaves nothing: the batch comes again and is learnt then. A
crash after 2 leaves both: on redelivery the user state skips the events and
the signals with them. A crash between 1 and 2 leaves the signals learnt (the
restart replays the entry) and the users not: on redelivery the users apply
the events and the signals must not learn them again. So an event's signals
are learnt only when

* the user state applies it (``UserState.already_applied`` is false), which
  skips every redelivery whose users were stored, and a producer's duplicate
  (same ``event_id``, new offset) through ``recent_ids``; and
* the log has not covered it: its offset is above the logged position of its
  source, or its event time is newer than the position's (the rule user state
  uses: a broker that restarts empty restarts its offsets at 0, and an old
  offset with a newer event time is a new event).

That is enough because a position only moves with events whose signals were
learnt, and a batch's signals are logged before its users are stored: an event
the user state has applied was learnt (or covered) before, and an event the
user state applies but the log covers is exactly the crash between 1 and 2. A
producer's duplicate of an event learnt in that batch comes with it again and
is skipped by ``recent_ids`` as it was the first time; one that comes later is
skipped by the stored ``recent_ids``. *Limit:* positions are kept per source,
not per user: after a broker restart, an event at an offset the source has
passed that carries an event time older than the newest learnt from that
source is taken as learnt (the user state has the same limit, per user).

A batch whose users cannot be stored (a store outage; an event that cannot be
applied, which the agent then narrows down one event at a time) takes its entry
back (deletes it) before the error goes on: the retry learns as if it had never
been tried, and an event that ends up dead-lettered teaches nothing. If the
store refuses the deletion too, it is done before the next change is logged;
a crash in between is the crash between 1 and 2.

**Other changes** go to the same log, in the same sequence: catalogue
deletions (``forget``: the items leave trending) and the reset of the stream's
co-visits when a model version with its own transitions is swapped in
(``clear``). Every change is made under ``services.write_lock`` by the agents
and the swap, so the log's order is the order of the changes in memory.

**Snapshots.** Every ``STREAMREC_SIGNALS_SNAPSHOT_EVERY`` entries the state is
written whole: parts ``snapshot-part:<seq>:<n>`` of bounded size (trending: the
origin, and per item its stored score and undecayed total; co-visits: each row
with what it was taught, least recently updated first), then the ``snapshot``
marker naming the seq and the number of parts, with the positions; then the log
entries up to that seq and the previous snapshot's parts are deleted. A restart
loads the snapshot the marker names and replays the entries after it. A crash
while parts are written leaves the old marker, which names a complete snapshot
with a complete log after it; a crash after the new marker leaves entries and
parts it covers, skipped and deleted at the next start.

One writer per collection: the embedded store opens in one process at a time.
Several workers sharing one Qdrant server under one ``collection_prefix`` each
need a ``STREAMREC_REPLICA`` number of their own: the log is then
``signals_r<replica>``, and they share lessons as below.

**Several worker processes** (``streamrec worker --processes N``, or workers
on several machines with ``STREAMREC_REPLICA`` set) each apply the clicks of
the partitions they hold, yet trending and co-visits must learn from every
click. Each process keeps its own log as above and shares its
batches' lessons: once a batch is published in memory, its lesson (origin
process, its seq in the origin's log, the wall time, the trending adds and the
transitions) goes to the topic ``<topic_prefix>signals.lessons``, and every
other process learns it (``learn_from_peers``) as one entry of its own log whose
position is ``process/<origin>`` -> the origin's seq. A lesson at or below that
position is a redelivery and is skipped, so each process learns each lesson
once, across restarts, and the lesson consumer commits its offsets after the
entries are written. A batch does not wait for the broker: its lesson joins
the pending ones, and the exchange task (``stream.agents.lessons``) sends
them (``pending``, then ``acknowledged``), oldest first, one send at a time,
so that the lessons gathered meanwhile go out together: one record batch
instead of one per click batch, which slowed the embedded broker's single
lessons partition until the processes' freshness p99 tripled within three
minutes (docs/performance.md, "Lessons without the wait"). Pending lessons
stay until the broker acknowledges them (retried every second); a snapshot
keeps them in its marker, and after a restart those and every own lesson of
the log's tail are sent again: what was sent before is skipped by the
receivers' positions. Catalogue deletions and co-visit resets are not
shared: every process applies the whole catalogue and every swap itself.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from core.errors import StoreUnavailableError
from core.events import ClickEvent
from core.settings import Settings
from stream.covisit import StreamTransitions
from stream.kafka import Delivery
from stream.rwlock import ReadWriteLock
from stream.store import CollectionSpec, Point, VectorStore
from stream.trending import Trending

log = logging.getLogger(__name__)

ACTION_WEIGHT_FOR_TRENDING = {"view": 0.25, "click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
MARKER = "snapshot"
LOG_PREFIX = "log:"
PART_PREFIX = "snapshot-part:"
# Numbers and ids per snapshot part: a few hundred KB of JSON, well inside a
# Qdrant server's request limit (32 MB).
PART_VALUES = 20_000
READ_PAGE = 64  # log entries read per call at start-up (each up to a batch of clicks)

Position = tuple[int, float]  # (offset, event time) of a source
PEER_SOURCE = "process/"  # positions of lessons learnt from peer process i: "process/i" -> (its seq, its time)


def signals_spec(settings: Settings) -> CollectionSpec:
    """The log's collection: one per worker (``STREAMREC_REPLICA``) where several share a store."""
    suffix = "" if settings.replica is None else f"_r{settings.replica}"
    # Points carry payload only; a collection needs one named vector, which none of them has.
    return CollectionSpec(f"{settings.collection_prefix}signals{suffix}", {"unused": 1})


def covered(position: Position | None, offset: int, event_time: float) -> bool:
    """Whether a source's logged position covers a delivery (``UserState.already_applied``'s rule)."""
    return position is not None and offset <= position[0] and event_time <= position[1]


@dataclass
class Learnt:
    """What a batch of clicks teaches the signals shared by every user.

    Made by ``SignalLog.lesson``, collected while the batch is applied, logged
    before its users are stored and published after (``SignalLog.learning``).
    """

    at: float  # the batch's wall time: trending decays from it
    logged: Mapping[str, Position]  # positions the log covered before this batch
    trending: list[tuple[str, float]] = field(default_factory=list)  # (item, weight)
    transitions: list[tuple[list[str], str]] = field(default_factory=list)  # (previous items, item)
    positions: dict[str, Position] = field(default_factory=dict)  # after this batch, per source it learnt from
    clicked_lists: int = 0  # clicks on a served list (with a position): the CTR drift numerator

    def add_click(self, delivery: Delivery[ClickEvent], previous: list[str]) -> None:
        """A click the user state applies, after the user's ``previous`` items (oldest first)."""
        source = f"{delivery.topic}/{delivery.partition}"
        event = delivery.event
        before = self.positions.get(source) or self.logged.get(source)
        if covered(self.logged.get(source), delivery.offset, event.event_time):
            return  # logged by an attempt that crashed before the users were stored
        self.trending.append((event.item_id, ACTION_WEIGHT_FOR_TRENDING[event.action]))
        if previous:  # with nothing before it a click teaches no transition
            self.transitions.append((previous, event.item_id))
        self.positions[source] = (delivery.offset, max(event.event_time, before[1]) if before else event.event_time)
        if event.position is not None and event.action != "view":
            self.clicked_lists += 1

    @property
    def teaches(self) -> bool:
        return bool(self.trending)


def _payload_of(learnt: Learnt) -> dict[str, Any]:
    return {"at": learnt.at,
            "trending": [[item_id, weight] for item_id, weight in learnt.trending],
            "transitions": [[previous, item_id] for previous, item_id in learnt.transitions]}


def _teach(trending: Trending, covisit: StreamTransitions, at: float,
           adds: Sequence[Sequence[Any]], transitions: Sequence[Sequence[Any]]) -> None:
    """A batch's lesson, live and replayed alike."""
    for item_id, weight in adds:
        trending.add(item_id, weight, at)
    for previous, item_id in transitions:
        covisit.learn(previous, item_id)


def _replay(entry: Mapping[str, Any], trending: Trending, covisit: StreamTransitions,
            positions: dict[str, Position]) -> None:
    kind = entry.get("kind")
    if kind == "learn":
        _teach(trending, covisit, entry["at"], entry["trending"], entry["transitions"])
        positions.update(_positions(entry["positions"]))
    elif kind == "forget":
        for item_id in entry["items"]:
            trending.forget(item_id)
    elif kind == "clear":
        covisit.clear()
    else:
        raise StoreUnavailableError(f"signal log entry {entry.get('seq')} has an unknown kind {kind!r}")


def _positions(stored: Mapping[str, Sequence[Any]]) -> dict[str, Position]:
    return {source: (int(offset), float(event_time)) for source, (offset, event_time) in stored.items()}


def _log_id(seq: int) -> str:
    return f"{LOG_PREFIX}{seq:012d}"


def _part_id(seq: int, part: int) -> str:
    return f"{PART_PREFIX}{seq:012d}:{part:06d}"


def _seq_of(point_id: str) -> int:
    """The seq in a log entry's or snapshot part's id."""
    return int(point_id.split(":")[1])


def _pages(ids: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


def _parts(trending_rows: list[tuple[str, float, float]],
           covisit_rows: list[tuple[str, float, list[tuple[str, float]]]]) -> list[dict[str, Any]]:
    """The snapshot's payloads, at most about ``PART_VALUES`` numbers and ids each; at least one."""
    parts: list[dict[str, Any]] = []
    current: dict[str, list[Any]] = {"trending": [], "covisit": []}
    size = 0
    for kind, row, values in (
        *(("trending", list(row), 3) for row in trending_rows),
        *(("covisit", [source, learnt, [list(pair) for pair in pairs]], 2 + 2 * len(pairs))
          for source, learnt, pairs in covisit_rows),
    ):
        if size and size + values > PART_VALUES:
            parts.append(current)
            current, size = {"trending": [], "covisit": []}, 0
        current[kind].append(row)
        size += values
    parts.append(current)
    return parts


@dataclass
class Restored:
    """Where a replayed log left off."""

    positions: dict[str, Position]  # per source, the newest learnt
    seq: int  # the last seq in use
    snapshot: tuple[int, int] | None  # (seq, parts) of the snapshot the marker names
    log: list[int]  # seqs of the entries after it, oldest first
    stale: list[str]  # ids an interrupted compaction left, to delete
    seconds: float
    # This process's click lessons, as shared: those the snapshot kept unacknowledged, then the log's.
    own: list[dict[str, Any]] = field(default_factory=list)


def restore(store: VectorStore, collection: str, trending: Trending, covisit: StreamTransitions) -> Restored:
    """Load the snapshot and replay the log into ``trending`` and ``covisit`` (fresh ones)."""
    started = time.perf_counter()
    ids = list(store.scroll_ids(collection))
    marker = store.retrieve(collection, [MARKER]).get(MARKER)
    positions: dict[str, Position] = {}
    snapshot: tuple[int, int] | None = None
    if marker is not None:
        snapshot = (int(marker.payload["seq"]), int(marker.payload["parts"]))
        part_ids = [_part_id(snapshot[0], n) for n in range(snapshot[1])]
        found: dict[str, Any] = {}
        for page in _pages(part_ids, 8):
            found.update(store.retrieve(collection, page))
        missing = [part_id for part_id in part_ids if part_id not in found]
        if missing:
            raise StoreUnavailableError(
                f"collection {collection!r}: the signal snapshot {snapshot[0]} lacks {len(missing)} of its "
                f"{len(part_ids)} parts (e.g. {missing[0]!r}); drop the collection to start the signals afresh")
        trending_rows: list[tuple[str, float, float]] = []
        covisit_rows: list[tuple[str, float, list[tuple[str, float]]]] = []
        for part_id in part_ids:
            payload = found[part_id].payload
            trending_rows.extend((item_id, stored, total) for item_id, stored, total in payload["trending"])
            covisit_rows.extend((source, learnt, [(target, weight) for target, weight in pairs])
                                for source, learnt, pairs in payload["covisit"])
        trending.load(marker.payload["origin"], trending_rows)
        covisit.load(covisit_rows)
        positions = _positions(marker.payload["positions"])
    base = snapshot[0] if snapshot else 0
    logged = sorted(_seq_of(point_id) for point_id in ids if point_id.startswith(LOG_PREFIX))
    live = [seq for seq in logged if seq > base]
    stale = [_log_id(seq) for seq in logged if seq <= base]
    stale += [point_id for point_id in ids if point_id.startswith(PART_PREFIX) and _seq_of(point_id) != base]
    own: list[dict[str, Any]] = list(marker.payload.get("unsent", [])) if marker is not None else []
    for page in _pages(live, READ_PAGE):
        entries = store.retrieve(collection, [_log_id(seq) for seq in page])
        for seq in page:
            entry = entries[_log_id(seq)].payload
            _replay(entry, trending, covisit, positions)
            if entry.get("kind") == "learn" and "origin" not in entry:
                own.append(_shared(entry))
    seq = max([base, *logged, *(_seq_of(point_id) for point_id in ids if point_id.startswith(PART_PREFIX))])
    return Restored(positions, seq, snapshot, live, stale, time.perf_counter() - started, own)


def _shared(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A click lesson of the log as peers learn it (its ``origin`` added when it is sent)."""
    return {"seq": int(entry["seq"]), "at": entry["at"], "trending": entry["trending"],
            "transitions": entry["transitions"]}


def read_signals(store: VectorStore, settings: Settings) -> tuple[Trending, StreamTransitions, Restored]:
    """What a worker with these settings restores from ``store`` (which no worker may hold open)."""
    spec = signals_spec(settings)
    store.ensure_collection(spec)
    trending, covisit = Trending(settings.trending_half_life_s), StreamTransitions(settings.covisit_items)
    return trending, covisit, restore(store, spec.name, trending, covisit)


class SignalLog:
    """The log of every change to one worker's trending and co-visits (see the module docstring).

    ``lesson`` and ``learning`` for click batches, ``forget`` for catalogue
    deletions, ``clear_covisits`` for a swap; ``open`` restores at start-up.
    """

    def __init__(self, store: VectorStore, collection: str, trending: Trending, covisit: StreamTransitions,
                 visibility: ReadWriteLock, snapshot_every: int, restored: Restored) -> None:
        self._store = store
        self._collection = collection
        self._trending = trending
        self._covisit = covisit
        self._visibility = visibility
        self._snapshot_every = snapshot_every
        self._positions = dict(restored.positions)
        self._seq = restored.seq
        self._snapshot = restored.snapshot
        self._log = list(restored.log)  # seqs of the entries since the snapshot
        self._stale = list(restored.stale)  # ids to delete with the next snapshot
        self._unretracted: str | None = None  # an entry taken back whose deletion the store refused
        self._restored_own = list(restored.own)
        self._origin: int | None = None  # this process's index once it shares its lessons
        self._unsent: list[dict[str, Any]] = []  # lessons to send to the peers, oldest first
        self._sent_seq = 0  # the seq of the newest own lesson the broker acknowledged
        self._wake: Callable[[], None] | None = None
        # Agents change signals under services.write_lock already; this keeps
        # the log's order and memory's the same for any other caller too.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, store: VectorStore, settings: Settings, trending: Trending, covisit: StreamTransitions,
             visibility: ReadWriteLock) -> SignalLog:
        """Restore ``trending`` and ``covisit`` (fresh ones) from the log of ``store``."""
        spec = signals_spec(settings)
        store.ensure_collection(spec)
        restored = restore(store, spec.name, trending, covisit)
        if restored.stale:
            store.delete(spec.name, restored.stale)  # what an interrupted compaction left
            restored.stale = []
        log.info("signals restored in %.2fs: snapshot %s, %d log entries after it; %d trending items, "
                 "%d co-visit rows", restored.seconds, restored.snapshot[0] if restored.snapshot else "none",
                 len(restored.log), len(trending), len(covisit))
        return cls(store, spec.name, trending, covisit, visibility, settings.signals_snapshot_every, restored)

    @property
    def positions(self) -> dict[str, Position]:
        """Per source, the newest (offset, event time) whose signals are learnt."""
        with self._lock:
            return dict(self._positions)

    def lesson(self, at: float) -> Learnt:
        """An empty lesson for a batch applied at wall time ``at``."""
        with self._lock:
            return Learnt(at=at, logged=dict(self._positions))

    @contextmanager
    def learning(self, learnt: Learnt) -> Iterator[None]:
        """Log ``learnt``; run the body (which stores the batch's users); then publish it in memory.

        If the body raises, the entry is taken back and nothing is published.
        """
        if not learnt.teaches:
            yield
            return
        with self._lock:
            entry = self._append({
                "kind": "learn",
                **_payload_of(learnt),
                "positions": {source: list(position) for source, position in learnt.positions.items()},
            })
            try:
                yield
            except BaseException:
                self._take_back(entry)
                raise
            # Only once the users are stored: a request that sees the batch's
            # trending or co-visits then also sees what each user just did.
            with self._visibility.writing():
                _teach(self._trending, self._covisit, learnt.at, learnt.trending, learnt.transitions)
            self._positions.update(learnt.positions)
            if self._origin is not None:
                self._unsent.append(_shared({"seq": _seq_of(entry), **_payload_of(learnt)}))
                if self._wake is not None:
                    self._wake()
            self._compact_if_due()

    # -- lessons shared between worker processes ----------------------------------------

    def share(self, origin: int) -> None:
        """From now on, this log's click lessons are for the peers too (as process ``origin``);
        the restored ones (see ``Restored.own``) are pending again."""
        with self._lock:
            self._origin = origin
            self._unsent = self._restored_own + self._unsent
            self._restored_own = []
            if self._seq and (not self._unsent or self._unsent[-1]["seq"] < self._seq):
                # An empty lesson at the log's seq: the peers' positions then say they have
                # everything this process sent before, even what a snapshot compacted away.
                self._unsent.append({"seq": self._seq, "at": time.time(), "trending": [], "transitions": []})

    def on_pending(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (from the thread that applied a batch) whenever a batch leaves a lesson pending."""
        with self._lock:
            self._wake = wake

    def pending(self) -> tuple[int, list[bytes]]:
        """The pending lessons as they go to the broker, oldest first, and the newest one's seq (0: none)."""
        with self._lock:
            if not self._unsent:
                return 0, []
            values = [json.dumps({"origin": self._origin, **lesson}).encode() for lesson in self._unsent]
            return int(self._unsent[-1]["seq"]), values

    def acknowledged(self, seq: int) -> int:
        """The broker holds every pending lesson up to ``seq``; returns how many are still pending."""
        with self._lock:
            self._unsent = [lesson for lesson in self._unsent if int(lesson["seq"]) > seq]
            self._sent_seq = max(self._sent_seq, seq)
            return len(self._unsent)

    @property
    def sent_seq(self) -> int:
        """The seq of the newest own lesson the broker acknowledged (read without the lock: for gauges)."""
        return self._sent_seq

    @property
    def unsent_count(self) -> int:
        return len(self._unsent)

    def peer_seq(self, origin: int) -> int:
        """The seq of the newest lesson learnt from process ``origin`` (0: none)."""
        position = self._positions.get(f"{PEER_SOURCE}{origin}")
        return position[0] if position else 0

    def learn_from_peers(self, lessons: Sequence[Mapping[str, Any]]) -> int:
        """Learn other processes' lessons, each once; returns how many were new."""
        learnt = 0
        with self._lock:
            for lesson in lessons:
                origin, seq, at = int(lesson["origin"]), int(lesson["seq"]), float(lesson["at"])
                if origin == self._origin:
                    continue
                source = f"{PEER_SOURCE}{origin}"
                done = self._positions.get(source)
                if done is not None and seq <= done[0]:
                    continue  # learnt before: a lesson sent again after its origin restarted
                self._append({"kind": "learn", "origin": origin, "at": at, "trending": lesson["trending"],
                              "transitions": lesson["transitions"], "positions": {source: [seq, at]}})
                with self._visibility.writing():
                    _teach(self._trending, self._covisit, at, lesson["trending"], lesson["transitions"])
                self._positions[source] = (seq, at)
                learnt += 1
                self._compact_if_due()
        return learnt

    def forget(self, item_ids: Sequence[str]) -> None:
        """Items deleted from the catalogue leave trending."""
        with self._lock:
            known = [item_id for item_id in dict.fromkeys(item_ids) if item_id in self._trending]
            if not known:
                return
            self._append({"kind": "forget", "items": known})
            for item_id in known:
                self._trending.forget(item_id)
            self._compact_if_due()

    def clear_covisits(self, along_with: Callable[[], None] = lambda: None) -> None:
        """The stream's co-visits start again; ``along_with`` runs in the same step for requests
        (``stream.swap.install`` switches the model there).

        Logged first: if the store refuses, nothing has changed.
        """
        with self._lock:
            self._append({"kind": "clear"})
            with self._visibility.writing():
                self._covisit.clear()
                along_with()
            self._compact_if_due()

    # -- the log ------------------------------------------------------------------------

    def _append(self, change: dict[str, Any]) -> str:
        if self._unretracted is not None:
            self._store.delete(self._collection, [self._unretracted])
            self._unretracted = None
        seq = self._seq + 1
        entry = _log_id(seq)
        self._store.upsert(self._collection, [Point(entry, {}, {"seq": seq, **change})])
        self._seq = seq
        self._log.append(seq)
        return entry

    def _take_back(self, entry: str) -> None:
        self._log.remove(_seq_of(entry))
        try:
            self._store.delete(self._collection, [entry])
        except Exception as error:  # the batch's own error goes on; this one is retried later
            log.warning("signal log entry %s not taken back yet (%s)", entry, error)
            self._unretracted = entry

    def _compact_if_due(self) -> None:
        if len(self._log) < self._snapshot_every:
            return
        try:
            self._write_snapshot()
        except StoreUnavailableError as error:
            # The changes are logged; the snapshot is tried again after the next one.
            log.warning("signal snapshot not written (%s)", error)

    def _write_snapshot(self) -> None:
        started = time.perf_counter()
        seq = self._seq
        origin, trending_rows = self._trending.entries()
        parts = _parts(trending_rows, self._covisit.entries())
        part_ids = [_part_id(seq, n) for n in range(len(parts))]
        try:
            for part_id, part in zip(part_ids, parts):
                self._store.upsert(self._collection, [Point(part_id, {}, part)])
        except BaseException:
            self._stale.extend(part_ids)
            raise
        marker = {"seq": seq, "parts": len(parts), "origin": origin,
                  "positions": {source: list(position) for source, position in self._positions.items()},
                  # Own lessons the broker has not acknowledged: sent again after a restart.
                  "unsent": self._restored_own + self._unsent}
        self._store.upsert(self._collection, [Point(MARKER, {}, marker)])
        # From here on a restart starts from this snapshot: the rest is garbage.
        previous = [_part_id(self._snapshot[0], n) for n in range(self._snapshot[1])] if self._snapshot else []
        self._stale += [*map(_log_id, self._log), *previous]
        self._snapshot, self._log = (seq, len(parts)), []
        self._store.delete(self._collection, self._stale)
        self._stale = []
        log.info("signal snapshot %d written in %.2fs: %d parts, %d trending items, %d co-visit rows",
                 seq, time.perf_counter() - started, len(parts), len(trending_rows), len(self._covisit))
