"""catalog.items -> item vectors (text, image, fused) in the store."""
from __future__ import annotations

import asyncio

import faust

from stream.agents.base import DeadLetters, Received, process_batch
from stream.catalog import apply_catalog
from stream.errors import DecodeError
from stream.events import CatalogItem
from stream.services import Services
from stream.topics import Topics


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters) -> None:
    settings = services.settings

    async def apply(received: list[Received[CatalogItem]]) -> list[tuple[int, DecodeError]]:
        async with services.write_lock:
            rejected = await asyncio.to_thread(apply_catalog, services, [r.event for r in received])
        services.metrics.items_total.set(services.store.count(services.collections.items))
        return [(r.index, r.error) for r in rejected]

    @app.agent(topics.catalog, name=f"{settings.app_id}.catalog")
    async def catalog_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            await process_batch(services, dead_letters, events, CatalogItem, apply, topic_label="catalog")
