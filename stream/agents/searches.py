"""events.searches -> search intent in the user's sequence; answers searches that ask (k set)."""
from __future__ import annotations

import asyncio

import faust

from core.errors import DecodeError
from core.events import RecRequest, SearchEvent
from stream.agents.base import DeadLetters, process_batch
from stream.kafka import Delivery
from stream.partitions import SINGLE, Ownership
from stream.recommend import recommend
from stream.services import Services
from stream.topics import Topics
from stream.users import apply_interactions


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters,
           ownership: Ownership = SINGLE) -> None:
    """Process i of N reads the whole topic (under its own group) and applies the partitions
    ``p mod N == i``: those of the users whose state it holds."""
    settings = services.settings

    async def apply(received: list[Delivery[SearchEvent]]) -> list[tuple[int, DecodeError]]:
        async with services.write_lock:
            await asyncio.to_thread(apply_interactions, services, received)
        for r in received:
            if r.event.k is None:
                continue
            request = RecRequest(
                request_id=r.event.event_id, user_id=r.event.user_id,
                k=min(r.event.k, settings.max_k), query=r.event.query, event_time=r.event.event_time,
            )
            response = await services.answer(recommend, services, request, path="kafka")
            await topics.responses.send(key=r.event.user_id.encode(), value=response.to_bytes())
        return []

    @app.agent(topics.searches, name=f"{settings.app_id}.searches")
    async def search_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            if not ownership.single:
                events = [event for event in events if ownership.owns(event.message.partition)]
                if not events:
                    continue
            await process_batch(services, dead_letters, events, SearchEvent, apply, topic_label="searches")
