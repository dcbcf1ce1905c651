"""catalog.items -> item vectors (text, image, fused) in the store.

Before the agent starts, a catalogue with many vectors outside any HNSW graph
(a bulk load, or growth since the last build) is indexed: see ``index_catalogue``.
"""
from __future__ import annotations

import asyncio
import logging
import time

import faust

from core.errors import DecodeError
from core.events import CatalogItem
from stream.agents.base import DeadLetters, process_batch
from stream.catalog import apply_catalog
from stream.kafka import Delivery
from stream.partitions import SINGLE, Ownership
from stream.services import Services
from stream.topics import Topics

log = logging.getLogger(__name__)
# Searches scan unindexed vectors one by one: past ~20k 384-d vectors (~30 MB)
# a scan costs more than a request's whole latency budget on two cores.
INDEX_AT_START_UNINDEXED = 20_000


def index_catalogue(services: Services, threshold: int = INDEX_AT_START_UNINDEXED) -> bool:
    """Build the items' HNSW graph now if at least ``threshold`` vectors lie outside it.

    The embedded store's ``optimize`` holds the GIL for the whole build (minutes
    for 100k items on two shared cores): inside a serving worker it would stall
    requests and the consumers' heartbeats (a rebalance). So it runs when the
    worker starts, before any agent: after a bulk load, restart the workers one
    by one. Items added later land in a small unindexed segment that searches
    scan until the next start. A Qdrant server indexes in the background, so
    nothing is done for it. True if an index was built.
    """
    unindexed_count = getattr(services.store, "unindexed_vector_count", None)
    if unindexed_count is None:
        return False
    items = services.collections.items
    pending = unindexed_count(items)
    if pending < threshold:
        return False
    log.warning("indexing %d item vectors before serving (this blocks start-up) ...", pending)
    started = time.monotonic()
    services.store.optimize(items)
    log.warning("item index built in %.1f s", time.monotonic() - started)
    return True


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters,
           ownership: Ownership = SINGLE) -> None:
    """Every worker process applies the whole catalogue (each has a store of its own)."""
    settings = services.settings
    if not ownership.single:
        dead_letters = dead_letters.of_partitions(ownership.owns)
    index_catalogue(services)

    async def apply(received: list[Delivery[CatalogItem]]) -> list[tuple[int, DecodeError]]:
        async with services.write_lock:
            rejected = await asyncio.to_thread(apply_catalog, services, [r.event for r in received])
        services.metrics.items_total.set(services.store.count(services.collections.items))
        return [(r.index, r.error) for r in rejected]

    @app.agent(topics.catalog, name=f"{settings.app_id}.catalog")
    async def catalog_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            await process_batch(services, dead_letters, events, CatalogItem, apply, topic_label="catalog")
