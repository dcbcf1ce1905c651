"""events.images -> catalogue photos update item vectors; visual searches are answered."""
from __future__ import annotations

import asyncio

import faust

from core.errors import DecodeError
from core.events import ImageEvent, RecRequest
from stream.agents.base import DeadLetters, process_batch
from stream.catalog import apply_catalog_photos, embed_query_image
from stream.kafka import Delivery
from stream.partitions import SINGLE, Ownership
from stream.recommend import recommend
from stream.services import Services
from stream.topics import Topics


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters,
           ownership: Ownership = SINGLE) -> None:
    """Every worker process applies every catalogue photo; a visual search is answered (and a
    bad event dead-lettered) by the owner of its partition alone."""
    settings = services.settings
    if not ownership.single:
        dead_letters = dead_letters.of_partitions(ownership.owns)

    async def apply(received: list[Delivery[ImageEvent]]) -> list[tuple[int, DecodeError]]:
        photos = [i for i, r in enumerate(received) if r.event.purpose == "catalog_photo"]
        failures: list[tuple[int, DecodeError]] = []
        if photos:
            async with services.write_lock:
                rejected = await asyncio.to_thread(
                    apply_catalog_photos, services, [received[i].event for i in photos]
                )
            failures += [(photos[r.index], r.error) for r in rejected]
        for i, r in enumerate(received):
            event = r.event
            if event.purpose != "visual_search" or not ownership.owns(r.partition):
                continue
            try:
                vector = await asyncio.to_thread(embed_query_image, services, event.image)
            except DecodeError as error:
                failures.append((i, error))
                continue
            request = RecRequest(
                request_id=event.event_id, user_id=event.user_id or "", k=min(event.k or settings.default_k, settings.max_k),
                event_time=event.event_time,
            )
            response = await services.answer(recommend, services, request, path="kafka", image_vector=vector)
            await topics.responses.send(key=request.user_id.encode(), value=response.to_bytes())
        return failures

    @app.agent(topics.images, name=f"{settings.app_id}.images")
    async def image_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(max(1, settings.batch_size // 10), within=settings.batch_within_s):
            await process_batch(services, dead_letters, events, ImageEvent, apply, topic_label="images")
