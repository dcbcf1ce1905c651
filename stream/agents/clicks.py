"""events.clicks -> the user's sequence and vector, trending, in the store."""
from __future__ import annotations

import asyncio

import faust

from stream.agents.base import DeadLetters, Received, process_batch
from stream.errors import DecodeError
from stream.events import ClickEvent
from stream.services import Services
from stream.topics import Topics
from stream.users import Delivery, apply_interactions


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters) -> None:
    settings = services.settings

    async def apply(received: list[Received[ClickEvent]]) -> list[tuple[int, DecodeError]]:
        deliveries = [Delivery(r.event, r.topic, r.partition, r.offset) for r in received]
        async with services.write_lock:
            await asyncio.to_thread(apply_interactions, services, deliveries)
        return []

    @app.agent(topics.clicks, name=f"{settings.app_id}.clicks")
    async def click_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            await process_batch(services, dead_letters, events, ClickEvent, apply, topic_label="clicks")
