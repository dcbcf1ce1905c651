"""events.clicks -> the user's sequence and vector, trending, in the store.

Clicks are the bulk of the traffic, so this agent reads its topic with its own
aiokafka consumer (group ``<app_id>.clicks``) inside the worker rather than
through a Faust stream. Measured on the embedded broker (docs/performance.md),
a bare Faust agent that only takes batches moved clicks an order of magnitude
slower than a plain consumer loop that also decodes and commits: Faust's own
cost per event, not the click work, bounded ingest.

Offsets are committed only after the batch is in the store and its dead
letters are acknowledged, so a crash loses nothing; the batch is then
delivered again and skipped per user by the applied offsets (``stream.users``).
A commit refused because a rebalance moved the partitions is harmless for the
same reason: the new owner applies the batch again, idempotently. Commits run
beside the next batch rather than before it (a broker round trip that every
click waiting behind it would pay), and name the applied offsets explicitly.
"""
from __future__ import annotations

import asyncio

import faust
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from core.errors import DecodeError
from core.events import ClickEvent
from stream import kafka
from stream.agents.base import DeadLetters, RecordEvent, process_batch, run_consumer
from stream.partitions import SINGLE, Ownership
from stream.services import Services
from stream.topics import Topics
from stream.users import apply_interactions


async def consume_clicks(services: Services, dead_letters: DeadLetters, stop: asyncio.Event,
                         ownership: Ownership = SINGLE, partitions: int = 0) -> None:
    """With one process the consumer takes the partitions its group assigns; process i of N
    reads exactly the partitions ``p mod N == i`` of ``partitions``."""
    settings = services.settings

    async def apply(deliveries: list[kafka.Delivery[ClickEvent]]) -> list[tuple[int, DecodeError]]:
        async with services.write_lock:
            await asyncio.to_thread(apply_interactions, services, deliveries)
        return []

    async def handle(records: list[ConsumerRecord]) -> None:
        await process_batch(services, dead_letters, [RecordEvent(r) for r in records], ClickEvent, apply,
                            topic_label="clicks")

    group = kafka.consumer_groups(settings)["clicks"]
    topic = settings.topic("clicks")
    assign = None if ownership.single else [TopicPartition(topic, p) for p in ownership.owned(partitions)]
    consumer = kafka.consumer(settings, *([topic] if assign is None else []), group_id=group,
                              max_records=settings.batch_size, fetch_max_wait_ms=settings.ingest_fetch_max_wait_ms)
    # A dead letter the broker did not acknowledge leaves the batch unfinished: read it again.
    await run_consumer(consumer, handle, stop, name="click", reread_unfinished=True, assign=assign)


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters,
           ownership: Ownership = SINGLE, partitions: int = 0) -> None:
    stop = asyncio.Event()

    @app.task
    async def click_consumer() -> None:
        await consume_clicks(services, dead_letters, stop, ownership, partitions)

    @app.on_before_shutdown.connect
    async def stop_click_consumer(app: faust.App, **_: object) -> None:
        stop.set()
