"""Talking to a running stack the way producers and consumers do."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.stack import LocalStack
from core.events import DeadLetter, Event, RecRequest, RecResponse
from core.settings import Settings
from stream.client import EventPublisher, ResponseListener, http_recommend


def publish(settings: Settings, events: Iterable[Event | RecRequest]) -> None:
    async def run() -> None:
        async with EventPublisher(settings) as publisher:
            for event in events:
                await publisher.publish(event)
            await publisher.flush()

    asyncio.run(run())


def publish_raw(settings: Settings, messages: Iterable[tuple[str, bytes | None, bytes | None]]) -> None:
    async def run() -> None:
        async with EventPublisher(settings) as publisher:
            for topic, key, value in messages:
                await publisher.publish_raw(topic, value, key=key)
            await publisher.flush()

    asyncio.run(run())


def wait_until(condition: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def processed(stack: LocalStack, topic: str) -> float:
    return stack.worker.metric("streamrec_events_processed_total", {"topic": topic})


def ask_kafka(settings: Settings, user_id: str, **fields: object) -> RecResponse:
    request = RecRequest(request_id=uuid.uuid4().hex, user_id=user_id, **fields)  # type: ignore[arg-type]

    async def run() -> RecResponse:
        async with ResponseListener(settings) as listener, EventPublisher(settings, linger_ms=0) as publisher:
            waiter = listener.expect(request.request_id)
            await publisher.publish(request)
            return await asyncio.wait_for(waiter, 30)

    return asyncio.run(run())


def ask_http(settings: Settings, user_id: str, **fields: object) -> RecResponse:
    request = RecRequest(request_id=uuid.uuid4().hex, user_id=user_id, **fields)  # type: ignore[arg-type]
    return asyncio.run(http_recommend(settings, request))


def read_topic(settings: Settings, topic: str, count: int, timeout_s: float = 60) -> list[bytes]:
    """The first ``count`` values of ``topic`` (all partitions), from the beginning."""

    async def run() -> list[bytes]:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_list, group_id=None,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            values: list[bytes] = []
            deadline = time.monotonic() + timeout_s
            while len(values) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    values.extend(r.value for r in records)
            return values
        finally:
            await consumer.stop()

    return asyncio.run(run())


def dead_letters(settings: Settings, count: int, timeout_s: float = 60) -> list[DeadLetter]:
    raw = read_topic(settings, settings.topic("deadletter"), count, timeout_s)
    return [DeadLetter.model_validate_json(v) for v in raw]


def user_state(settings: Settings, user: str) -> dict:
    """GET /users/{user} of the running worker; {} while the user is unknown."""
    url = f"http://{settings.http_host}:{settings.http_port}/users/{user}"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError:
        return {}
