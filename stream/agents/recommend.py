"""rec.requests -> retrieve, score, re-rank -> rec.responses."""
from __future__ import annotations

import asyncio

import faust

from stream.agents.base import DeadLetters, Received, process_batch
from stream.errors import DecodeError
from stream.events import RecRequest
from stream.recommend import recommend
from stream.services import Services
from stream.topics import Topics


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters) -> None:
    settings = services.settings

    def answer_all(requests: list[RecRequest]) -> list[bytes]:
        return [recommend(services, r, path="kafka").to_bytes() for r in requests]

    async def apply(received: list[Received[RecRequest]]) -> list[tuple[int, DecodeError]]:
        requests = [r.event for r in received]
        for request, payload in zip(requests, await asyncio.to_thread(answer_all, requests)):
            await topics.responses.send(key=request.user_id.encode(), value=payload)
        return []

    @app.agent(topics.requests, name=f"{settings.app_id}.recommend")
    async def recommend_agent(stream: faust.StreamT) -> None:
        # Small batches: a request should not wait for others to arrive.
        async for events in stream.take_events(64, within=0.001):
            await process_batch(services, dead_letters, events, RecRequest, apply, topic_label="requests")
