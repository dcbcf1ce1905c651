"""What every agent does around its own logic: batch, decode, dead-letter, retry.

An agent supplies a schema and an ``apply`` function over decoded events. This
module turns a batch of raw Kafka messages into decoded events and dead letters,
publishes the dead letters (with the raw bytes and the reason), and applies the
rest. Store outages are retried with backoff without acknowledging the batch,
so nothing accepted is lost; an unexpected error on a batch is narrowed down by
applying its events one at a time, and only the event that still fails is
dead-lettered with the error.

Agents that read their topic with their own consumer rather than a Faust
stream (clicks, requests) share one poll loop, ``run_consumer``, which commits
a batch's offsets only after it has been handled.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel

from core.errors import DecodeError, StoreUnavailableError
from core.events import DeadLetter, decode
from stream.kafka import Delivery
from stream.services import Services
from stream.topics import Topics

log = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseModel)
POLL_TIMEOUT_MS = 100
KAFKA_RETRY_S = 0.5  # pause after a broker error before polling or reading again

# apply(deliveries) -> list of (index into deliveries, error) that could not be applied
ApplyFn = Callable[[list[Delivery[E]]], Awaitable[list[tuple[int, DecodeError]]]]


# publish(key, value) -> a future that resolves when the broker has the message
Publish = Callable[[bytes | None, bytes], Awaitable[Awaitable[object]]]


class DeadLetters:
    """Publishes dead letters through whichever producer the caller uses."""

    def __init__(self, services: Services, publish: Publish,
                 keep: Callable[[int], bool] | None = None) -> None:
        self._services = services
        self._publish = publish
        self._keep = keep

    def of_partitions(self, keep: Callable[[int], bool]) -> "DeadLetters":
        """These dead letters, published only for messages of the partitions ``keep`` accepts.

        Topics every worker process reads whole (the catalogue, photos) would
        otherwise dead-letter a bad message once per process: its partition's
        owner does it alone.
        """
        return DeadLetters(self._services, self._publish, keep)

    @classmethod
    def via_faust(cls, services: Services, topics: Topics) -> "DeadLetters":
        return cls(services, lambda key, value: topics.deadletter.send(key=key, value=value))

    async def send(self, message: Any | None, raw: bytes | None, error: DecodeError,
                   *, topic: str, key: bytes | None = None) -> None:
        """``message`` is a faust Message or an aiokafka ConsumerRecord (same fields)."""
        if self._keep is not None and message is not None and not self._keep(message.partition):
            return
        letter = DeadLetter.of(
            raw,
            error,
            topic=topic,
            partition=message.partition if message else None,
            offset=message.offset if message else None,
            key=key if key is not None else (message.key if message else None),
        )
        # Waiting for the broker's ack keeps "nothing accepted is lost" true:
        # the source offset is committed only after this returns.
        sent = await self._publish(key or (message.key if message else None), letter.to_bytes())
        await sent
        self._services.metrics.dead_letters.labels(topic, error.reason).inc()


async def process_batch(
    services: Services,
    dead_letters: DeadLetters,
    events: Sequence[faust.EventT],
    schema: type[E],
    apply: ApplyFn[E],
    *,
    topic_label: str,
) -> None:
    settings = services.settings
    received: list[Delivery[E]] = []
    messages = []
    for event in events:
        message = event.message
        try:
            decoded = decode(schema, message.value, max_bytes=settings.max_event_bytes)
        except DecodeError as error:
            await dead_letters.send(message, message.value, error, topic=message.topic)
            continue
        received.append(Delivery(decoded, message.topic, message.partition, message.offset))
        messages.append(message)
    services.metrics.batch_size.labels(topic_label).observe(len(events))
    if not received:
        return
    failures = await _apply_with_retry(apply, received)
    failed = {index for index, _ in failures}
    for index, error in failures:
        message = messages[index]
        await dead_letters.send(message, message.value, error, topic=message.topic)
    services.metrics.events_processed.labels(topic_label).inc(len(received) - len(failed))


async def _apply_with_retry(apply: ApplyFn[E], received: list[Delivery[E]]) -> list[tuple[int, DecodeError]]:
    delay = 0.1
    while True:
        try:
            return await apply(received)
        except StoreUnavailableError as exc:
            log.warning("store unavailable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        except Exception:
            if len(received) == 1:
                log.exception("event could not be applied; dead-lettering it")
                return [(0, DecodeError("processing_error", _describe_current_exception()))]
            log.exception("batch failed; applying its %d events one by one", len(received))
            failures: list[tuple[int, DecodeError]] = []
            for index, one in enumerate(received):
                for _, error in await _apply_with_retry(apply, [one]):
                    failures.append((index, error))
            return failures


class RecordEvent:
    """An aiokafka record in the shape ``process_batch`` reads from a Faust event: ``.message``."""

    __slots__ = ("message",)

    def __init__(self, message: object) -> None:
        self.message = message


class Committer:
    """Commits the offsets of handled batches in the background, one commit at a time.

    A direct consumer's next batch need not wait for a broker round trip. The
    offsets are named explicitly, and only those of batches already handled:
    the consumer's own position runs ahead of them while a batch is in work.
    """

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._applied: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None

    def applied(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        for partition, records in batches.items():
            self._applied[partition] = records[-1].offset + 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._commit())

    async def flush(self) -> None:
        if self._task is not None:
            await self._task

    async def _commit(self) -> None:
        committed: dict[TopicPartition, int] = {}
        while self._applied != committed:
            committed = dict(self._applied)
            # After a rebalance only partitions still held may be committed.
            held = {tp: offset for tp, offset in committed.items() if tp in self._consumer.assignment()}
            try:
                if held:
                    await self._consumer.commit(held)
            except KafkaError as exc:
                log.warning("offsets not committed (%s); those messages will be handled again", exc)


async def run_consumer(
    consumer: AIOKafkaConsumer,
    handle: Callable[[list[ConsumerRecord]], Awaitable[None]],
    stop: asyncio.Event,
    *,
    name: str,
    ready: asyncio.Event | None = None,
    reread_unfinished: bool = False,
    assign: Sequence[TopicPartition] | None = None,
) -> None:
    """Start ``consumer``, hand each batch to ``handle`` and commit it once handled, until ``stop``.

    A batch is at most the consumer's ``max_poll_records``. ``ready`` is set once
    the consumer holds partitions. With ``assign`` the consumer reads exactly
    those partitions (no group membership, no rebalance; offsets are still
    committed to and resumed from its group) instead of the topics it subscribed to. A ``KafkaError`` out of ``handle`` means a
    message it sent (a dead letter, say) was not acknowledged, so the batch must
    not be committed: with ``reread_unfinished`` the consumer seeks back and
    reads the batch again, otherwise the error ends the loop.
    """
    await consumer.start()
    if assign is not None:
        consumer.assign(list(assign))
    committer = Committer(consumer)
    try:
        while not stop.is_set():
            try:
                batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                log.warning("%s consumer: %s; retrying", name, exc)
                await asyncio.sleep(KAFKA_RETRY_S)
                continue
            if ready is not None and not ready.is_set() and consumer.assignment():
                ready.set()
            records = [record for batch in batches.values() for record in batch]
            if not records:
                continue
            try:
                await handle(records)
            except KafkaError as exc:
                if not reread_unfinished:
                    raise
                log.warning("%s batch not finished (%s); reading it again", name, exc)
                for partition, batch in batches.items():
                    consumer.seek(partition, batch[0].offset)
                await asyncio.sleep(KAFKA_RETRY_S)
                continue
            committer.applied(batches)
    finally:
        await committer.flush()
        await consumer.stop()


def _describe_current_exception() -> str:
    import sys

    exc = sys.exc_info()[1]
    return f"{type(exc).__name__}: {exc}"[:2000]
