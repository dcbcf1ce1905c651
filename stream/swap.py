"""Hot swap of the serving model inside a running worker.

A ``ModelUpdate`` on ``model.updates`` is a trigger: the worker compares the
registry's ``current`` version with the one it serves and, if they differ,

1. loads the new version with every file's sha256 verified (a corrupt or
   incomplete artefact is refused and the worker keeps serving its model);
2. rebuilds item, user and query vectors for the new version into new
   collections ``items_<version>``, ``users_<version>``, ``queries_<version>``
   while the agents keep applying events to the serving ones: a ``Journal``
   in front of the store notes every point written to those meanwhile, and
   the noted points are rebuilt again (catch-up) until few are left;
3. under the write lock (ingestion waits only for this last, small
   catch-up) rebuilds the last noted points and replaces ``services.serving``
   (model + collections + item cache) with one assignment. ``recommend`` reads that reference once per request, so a
   request in flight finishes on the old version and the next starts on the
   new one: no request mixes versions, none is dropped.

Which collections hold which version's vectors is recorded in
``<data_dir>/store/serving.json`` so a restarted worker opens the right ones.
The collections a swap replaces are kept for one more swap (requests in flight
and other workers sharing a Qdrant server may still read them, and a rollback
to the previous version finds them) and dropped at the swap after.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import SimpleNamespace

import numpy as np

from core.errors import ModelLoadError
from model.serving.contract import (
    CONTENT_TEXT_FIELDS,
    ItemContent,
    ServingModel,
    compose_text,
)
from model.serving.registry import Registry
from stream.item_vectors import (
    item_points,
    payload_attribute_text,
    stored_vectors,
    write_items,
)
from stream.services import Services, check_encoders
from stream.store import Point
from stream.users import SHARE_CHUNK, UserState, share_users, user_vectors
from stream.versions import (
    Collections,
    ServingState,
    collection_specs,
    default_collections,
    new_item_cache,
    read_pointer,
    recorded,
    version_collections,
    write_pointer,
)

log = logging.getLogger(__name__)
CHUNK = 1024
CATCH_UP_ROUNDS = 5  # rebuilds of what changed during the previous one, before the write lock
CATCH_UP_UNDER_LOCK = 256  # points few enough to rebuild while ingestion waits


def retire(services: Services, replaced: Collections, serving: Collections) -> Collections | None:
    """Drop the collections retired by the previous swap; ``replaced`` is kept until the next one.

    Returns what stays retired now (None when ``replaced`` is what serves).
    """
    earlier = recorded(read_pointer(services.settings), "retired")
    keep = {*dataclasses.astuple(replaced), *dataclasses.astuple(serving)}
    if earlier is not None:
        for name in dataclasses.astuple(earlier):
            if name not in keep:
                services.store.drop_collection(name)
                log.info("dropped collection %s (replaced two swaps ago)", name)
    return None if replaced == serving else replaced


# --- rebuilding vectors for a model ----------------------------------------------
def _chunks(ids: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item_id in ids:
        chunk.append(item_id)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rebuild_items(services: Services, model: ServingModel, old: Collections, new: ServingState,
                   stored_fields: tuple[str, ...], only: set[str] | None = None) -> int:
    """The new version's item vectors, from each item's stored text and photo vectors.

    ``stored_fields``: what the stored text vectors were embedded from. A
    version that reads other fields as item text (the rule model reads title,
    category and description; a trained model the title it was trained on)
    gets its text vectors re-embedded from the payload's fields.
    """
    store, count = services.store, 0
    reembed = tuple(model.text_fields) != tuple(stored_fields)
    for ids in _chunks(store.scroll_ids(old.items) if only is None else iter(sorted(only))):
        hits = store.retrieve(old.items, ids, with_vectors=["text", "image"])
        found = [hits[i] for i in ids if i in hits]
        gone = [i for i in ids if i not in hits]
        if only is not None and gone:  # deleted from the serving items since the build read them
            store.delete(new.collections.items, gone)
            new.item_cache.drop(gone)
        if not found:
            continue
        image, has_image = stored_vectors(found, "image", model.image_dim)
        if reembed:
            texts = [compose_text(model.text_fields, hit.payload) for hit in found]
            has_text = np.array([bool(t) for t in texts])
            text = np.zeros((len(found), model.text_dim), np.float32)
            if has_text.any():
                text[has_text] = services.text_encoder.encode([t for t in texts if t])  # type: ignore[union-attr]
        else:
            text, has_text = stored_vectors(found, "text", model.text_dim)
        content = ItemContent([h.id for h in found], text, image, has_text, has_image,
                              [payload_attribute_text(hit) for hit in found])
        payloads = [{k: v for k, v in hit.payload.items() if k != "id"} for hit in found]
        # The new model's vectors go to the new state only: the old one serves until ``install``.
        points = item_points(model, content, payloads)
        write_items(store, new, points)
        count += len(points)
    return count


def _rebuild_queries(services: Services, model: ServingModel, old: Collections, new: Collections,
                     only: set[str] | None = None) -> int:
    store, count = services.store, 0
    for ids in _chunks(store.scroll_ids(old.queries) if only is None else iter(sorted(only))):
        hits = [h for h in store.retrieve(old.queries, ids).values() if h.payload.get("query")]
        if not hits:
            continue
        text = services.text_encoder.encode([str(h.payload["query"]) for h in hits])  # type: ignore[attr-defined]
        vectors = model.query_vectors(text)
        store.upsert(new.queries, [
            Point(h.id, {"fused": v}, {k: val for k, val in h.payload.items() if k != "id"})
            for h, v in zip(hits, vectors)
        ])
        count += len(hits)
    return count


def _rebuild_users(services: Services, old: Collections, new: ServingState, only: set[str] | None = None) -> int:
    store, count = services.store, 0
    # A view of the services that already serves the new state, so user_vectors
    # reads the new item and query vectors and calls the new user tower.
    view = dataclasses.replace(services, serving=new)
    for ids in _chunks(store.scroll_ids(old.users) if only is None else iter(sorted(only))):
        hits = store.retrieve(old.users, ids)
        states = [UserState.from_payload(uid, hits[uid].payload) for uid in ids if uid in hits]
        if not states:
            continue
        vectors = user_vectors(view, states)  # (B, fused_dim)
        store.upsert(new.collections.users, [
            Point(s.user_id, {"user": v} if np.any(v) else {},
                  {k: val for k, val in hits[s.user_id].payload.items() if k != "id"})
            for s, v in zip(states, vectors)
        ])
        count += len(states)
    return count


def build_state(services: Services, model: ServingModel, source: Collections | None = None,
                source_text_fields: tuple[str, ...] | None = None) -> ServingState:
    """Vectors of every stored item, query and user for ``model``, in new collections.

    ``source``: where the current items, queries and users are (default: the served ones);
    ``source_text_fields``: what their text vectors were embedded from (default: the served model's).
    """
    settings, old = services.settings, source or services.serving.collections
    collections = version_collections(settings, model.version)
    if collections == old:
        return services.serving
    for spec in collection_specs(collections, model):
        services.store.ensure_collection(spec)
    state = ServingState(model, collections, new_item_cache(settings, model))
    started = time.monotonic()
    stored_fields = source_text_fields or tuple(services.serving.model.text_fields)
    items = _rebuild_items(services, model, old, state, stored_fields)
    queries = _rebuild_queries(services, model, old, collections)
    users = _rebuild_users(services, old, state)
    if items:
        services.store.optimize(collections.items)
    log.info("rebuilt %d items, %d queries, %d users for %s in %.1fs",
             items, queries, users, model.version, time.monotonic() - started)
    return state


# --- the swap itself ---------------------------------------------------------------
def install(services: Services, state: ServingState, replaced: Collections | None = None) -> None:
    """Switch every later request to ``state`` (one reference assignment).

    ``replaced``: the collections that held the vectors until now (default: the served ones).
    """
    replaced = replaced or services.serving.collections

    def switch() -> None:
        services.serving = state

    if state.model.transitions is not None:
        # Its table holds the clicks the fine-tuner drained: counting the
        # stream's copy of them as well would weigh them twice. Logged, so
        # that a restart does not bring them back; first, so that a store
        # that refuses leaves the old version serving.
        services.signals.clear_covisits(along_with=switch)
    else:
        with services.visibility.writing():
            switch()
    services.drift.reset()  # the reference window belongs to the model that serves
    services.metrics.model_info.info({"version": state.model.version})
    services.metrics.model_loaded_timestamp.set(time.time())
    services.metrics.model_swaps.labels("ok").inc()
    retired = retire(services, replaced, state.collections)
    write_pointer(services.settings, state.model, state.collections, retired)


class Journal:
    """The store, noting the ids of every point written to ``watched`` collections.

    Put in front of ``services.store`` while a new version is built, so the
    points the agents change meanwhile can be rebuilt before the switch.
    """

    def __init__(self, store: object, watched: Collections) -> None:
        self.store = store
        self.watched = watched
        self._lock = threading.Lock()
        self._noted: dict[str, set[str]] = {name: set() for name in dataclasses.astuple(watched)}

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def _note(self, collection: str, ids: Iterable[str]) -> None:
        if collection in self._noted:
            with self._lock:
                self._noted[collection].update(str(i) for i in ids)

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        self._note(collection, (point.id for point in points))
        self.store.upsert(collection, points)  # type: ignore[attr-defined]

    def update_payload(self, collection: str, point_id: str, payload: dict) -> None:  # type: ignore[type-arg]
        self._note(collection, [point_id])
        self.store.update_payload(collection, point_id, payload)  # type: ignore[attr-defined]

    def update_vectors(self, collection: str, *args: object, **kwargs: object) -> None:
        ids = args[0] if args else kwargs.get("points", kwargs.get("ids", []))
        self._note(collection, [getattr(item, "id", item) for item in ids])  # type: ignore[union-attr]
        self.store.update_vectors(collection, *args, **kwargs)  # type: ignore[attr-defined]

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        self._note(collection, ids)
        self.store.delete(collection, ids)  # type: ignore[attr-defined]

    def take(self) -> Collections:
        """The ids noted since the last ``take`` (as ``Collections`` of sets), and forget them."""
        with self._lock:
            noted = self._noted
            self._noted = {name: set() for name in dataclasses.astuple(self.watched)}
        return Collections(*(noted[name] for name in dataclasses.astuple(self.watched)))  # type: ignore[arg-type]


def catch_up(services: Services, model: ServingModel, old: Collections, state: ServingState,
             changed: Collections, stored_fields: tuple[str, ...]) -> int:
    """Rebuild into ``state`` the points of ``old`` noted in ``changed``; returns how many."""
    items, queries, users = changed.items, changed.queries, changed.users  # sets of ids
    count = 0
    if items:
        count += _rebuild_items(services, model, old, state, stored_fields, only=items)  # type: ignore[arg-type]
    if queries:
        count += _rebuild_queries(services, model, old, state.collections, only=queries)  # type: ignore[arg-type]
    if users:
        count += _rebuild_users(services, old, state, only=users)  # type: ignore[arg-type]
    return count


async def hot_swap(services: Services, version: str | None = None) -> bool:
    """Serve ``version`` (default: the registry's current one); False when refused or unchanged.

    Events keep being applied while the new version's vectors are built; the write
    lock is held only for the last catch-up and the switch.
    """
    settings = services.settings
    registry = Registry(settings.models_path)
    target = version or registry.current_version()
    if target is None or target == services.model.version:
        return False
    try:
        model = await asyncio.to_thread(registry.load, target, threads=settings.onnx_threads,
                                        int8=settings.onnx_int8)
        check_encoders(model, settings.models_path / "towers")
    except ModelLoadError as error:
        log.error("model %s refused, still serving %s: %s", target, services.model.version, error)
        services.metrics.model_swaps.labels("refused").inc()
        return False
    old = services.serving.collections
    stored_fields = tuple(services.serving.model.text_fields)
    journal = Journal(services.store, old)
    async with services.write_lock:  # between two batches: none holds the plain store from now on
        services.store = journal  # type: ignore[assignment]
    try:
        state = await asyncio.to_thread(build_state, services, model)
        for _ in range(CATCH_UP_ROUNDS):
            changed = journal.take()
            if sum(len(ids) for ids in dataclasses.astuple(changed)) <= CATCH_UP_UNDER_LOCK:
                _merge(journal, changed)
                break
            await asyncio.to_thread(catch_up, services, model, old, state, changed, stored_fields)
        async with services.write_lock:
            # No agent writes now: what is noted is all that is left.
            last = catch_up(services, model, old, state, journal.take(), stored_fields)
            install(services, state)
    finally:
        services.store = journal.store  # type: ignore[assignment]
    log.warning("now serving model %s (%s); %d points caught up under the write lock",
                state.model.version, state.collections.items, last)
    if services.user_table is not None:
        await _reshare_users(services)
    return True


async def _reshare_users(services: Services) -> None:
    """Write every user to the shared user table again, with the new version's vector: the other
    processes answer them here from now on, not only after each one's next click. A chunk at a time
    under the write lock, between click batches: the table has one writer."""
    ids = await asyncio.to_thread(lambda: list(services.store.scroll_ids(services.collections.users)))
    for start in range(0, len(ids), SHARE_CHUNK):
        async with services.write_lock:
            await asyncio.to_thread(share_users, services, ids[start:start + SHARE_CHUNK])
    log.info("%d users shared again for model %s", len(ids), services.model.version)


def _merge(journal: Journal, changed: Collections) -> None:
    """Put ids taken from ``journal`` back (they are rebuilt by the next ``take``)."""
    for name, ids in zip(dataclasses.astuple(journal.watched), dataclasses.astuple(changed)):
        journal._note(name, ids)  # noqa: SLF001 - the journal's own bookkeeping


def reconcile(services: Services) -> None:
    """Make the stored vectors match the model this worker loaded, before it serves.

    A first start records the pointer. A worker that was down while another
    version was promoted finds the pointer naming the previous version: its
    stored vectors belong to that version (``Services.open`` opened the loaded
    version's own, empty collections), so they are rebuilt for the model just
    loaded. Runs before any agent, so no event lands in a half-built state.
    """
    settings = services.settings
    pointer = read_pointer(settings)
    if pointer is None:
        write_pointer(settings, services.model, services.collections)
    elif pointer.get("version") != services.model.version:
        source = recorded(pointer) or default_collections(settings)
        dims = SimpleNamespace(text_dim=pointer["text_dim"], image_dim=pointer["image_dim"],
                               fused_dim=pointer["fused_dim"])
        for spec in collection_specs(source, dims):  # type: ignore[arg-type]
            services.store.ensure_collection(spec)
        # A pointer without text fields comes from a worker whose every
        # text vector was embedded from all of an item's text.
        stored_fields = tuple(pointer.get("text_fields", CONTENT_TEXT_FIELDS))
        state = build_state(services, services.model, source, stored_fields)
        install(services, state, replaced=source)


async def listen_for_updates(services: Services, stop: asyncio.Event) -> None:
    """Check the registry again on every ``model.updates`` message.

    The consumer has no group: every worker must see every update, and a
    replayed old message only triggers a check that finds nothing to do.
    """
    from aiokafka.errors import KafkaError

    from stream import kafka

    settings = services.settings
    consumer = kafka.consumer(settings, settings.topic("model_updates"), group_id=None, fetch_max_wait_ms=200)
    await consumer.start()
    try:
        while not stop.is_set():
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except KafkaError as error:
                log.warning("model.updates consumer: %s; retrying", error)
                await asyncio.sleep(1.0)
                continue
            if any(batches.values()):
                await hot_swap(services)
    finally:
        await consumer.stop()


def attach(app: object, services: Services) -> None:
    """Serve the registry's current version, then ``listen_for_updates``, as a task of the worker's app."""
    stop = asyncio.Event()

    @app.task  # type: ignore[attr-defined]
    async def model_update_listener() -> None:
        await hot_swap(services)  # promoted between start-up and now
        await listen_for_updates(services, stop)

    @app.on_before_shutdown.connect  # type: ignore[attr-defined]
    async def stop_model_update_listener(app: object, **_: object) -> None:
        stop.set()
