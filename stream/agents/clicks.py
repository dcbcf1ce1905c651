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
import logging

import faust
from aiokafka.errors import KafkaError

from core.errors import DecodeError
from core.events import ClickEvent
from stream.agents.base import (
    Committer,
    DeadLetters,
    Received,
    RecordEvent,
    direct_consumer,
    process_batch,
)
from stream.services import Services
from stream.topics import Topics
from stream.users import Delivery, apply_interactions

log = logging.getLogger(__name__)
POLL_TIMEOUT_MS = 100


async def consume_clicks(services: Services, dead_letters: DeadLetters, stop: asyncio.Event) -> None:
    settings = services.settings

    async def apply(received: list[Received[ClickEvent]]) -> list[tuple[int, DecodeError]]:
        deliveries = [Delivery(r.event, r.topic, r.partition, r.offset) for r in received]
        async with services.write_lock:
            await asyncio.to_thread(apply_interactions, services, deliveries)
        return []

    consumer = direct_consumer(settings, settings.topic("clicks"), f"{settings.app_id}.clicks",
                               settings.batch_size)
    await consumer.start()
    committer = Committer(consumer)
    try:
        while not stop.is_set():
            try:
                batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=settings.batch_size)
            except KafkaError as exc:
                log.warning("click consumer: %s; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            records = [record for batch in batches.values() for record in batch]
            if not records:
                continue
            try:
                await process_batch(services, dead_letters, [RecordEvent(r) for r in records], ClickEvent,
                                    apply, topic_label="clicks")
            except KafkaError as exc:  # a dead letter was not acknowledged: read the batch again
                log.warning("click batch not finished (%s); reading it again", exc)
                for partition, batch in batches.items():
                    consumer.seek(partition, batch[0].offset)
                await asyncio.sleep(0.5)
                continue
            committer.applied(batches)
    finally:
        await committer.flush()
        await consumer.stop()


def attach(app: faust.App, topics: Topics, services: Services, dead_letters: DeadLetters) -> None:
    stop = asyncio.Event()

    @app.task
    async def click_consumer() -> None:
        await consume_clicks(services, dead_letters, stop)

    @app.on_before_shutdown.connect
    async def stop_click_consumer(app: faust.App, **_: object) -> None:
        stop.set()
