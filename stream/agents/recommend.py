"""rec.requests -> retrieve, score, re-rank -> rec.responses.

Requests are latency-bound, not throughput-bound, so this agent reads its
topic with its own aiokafka consumer (group ``<app_id>.requests``) inside the
worker instead of through a Faust stream: measured on the embedded broker,
Faust's fetch path (consumer thread hand-off, 1.5 s fetch wait) added 0.2-0.7 s
per request, while a direct consumer delivers in a few milliseconds. Offsets
are committed only after the responses (and any dead letters) are acknowledged
by the broker (beside the next batch, which need not wait for the commit), so
no request is dropped by a crash; a replayed request is
answered again, which is harmless for readers that match by ``request_id``.
"""
from __future__ import annotations

import asyncio

import faust
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from core.errors import DecodeError
from core.events import RecRequest
from stream import kafka
from stream.agents.base import DeadLetters, RecordEvent, process_batch, run_consumer
from stream.partitions import SINGLE, Ownership
from stream.recommend import recommend
from stream.services import Services
from stream.topics import Topics

MAX_REQUESTS_PER_POLL = 64


async def serve_requests(services: Services, stop: asyncio.Event, ready: asyncio.Event,
                         ownership: Ownership = SINGLE, partitions: int = 0) -> None:
    """With N processes, process i answers the partitions ``p mod N == i`` of ``partitions``."""
    settings = services.settings
    group = kafka.consumer_groups(settings)["requests"]
    topic = settings.topic("requests")
    assign = None if ownership.single else [TopicPartition(topic, p) for p in ownership.owned(partitions)]
    consumer = kafka.consumer(settings, *([topic] if assign is None else []), group_id=group,
                              max_records=MAX_REQUESTS_PER_POLL)
    # Answers go out at once rather than waiting to fill a batch.
    producer = kafka.producer(settings, linger_ms=0)
    responses_topic = settings.topic("responses")
    dead_letters = DeadLetters(
        services, lambda key, value: producer.send(settings.topic("deadletter"), value, key=key)
    )

    def answer(request: RecRequest) -> bytes:
        return recommend(services, request, path="kafka").to_bytes()

    async def apply(received: list[kafka.Delivery[RecRequest]]) -> list[tuple[int, DecodeError]]:
        # One at a time, each sent as soon as it is ready: the first answer of a
        # batch does not wait for the last, and HTTP requests (answered on the
        # same event loop) get their turn between two of these.
        sent = []
        for delivery in received:
            payload = await services.answer(answer, delivery.event)
            sent.append(await producer.send(responses_topic, payload, key=delivery.event.user_id.encode()))
            await asyncio.sleep(0)
        await asyncio.gather(*sent)
        return []

    async def handle(records: list[ConsumerRecord]) -> None:
        await process_batch(services, dead_letters, [RecordEvent(r) for r in records], RecRequest, apply,
                            topic_label="requests")

    await producer.start()
    try:
        await run_consumer(consumer, handle, stop, name="request", ready=ready, assign=assign)
    finally:
        await producer.stop()


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters,
           ownership: Ownership = SINGLE, partitions: int = 0) -> asyncio.Event:
    """Start the request server with the app; the returned event is set once it holds partitions."""
    stop, ready = asyncio.Event(), asyncio.Event()

    @app.task
    async def request_server() -> None:
        await serve_requests(services, stop, ready, ownership, partitions)

    @app.on_before_shutdown.connect
    async def stop_request_server(app: faust.App, **_: object) -> None:
        stop.set()

    return ready
