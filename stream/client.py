"""Producing events and reading responses: what a producer or downstream service does.

``EventPublisher`` sends typed events keyed as the design requires (user id, or
item id for the catalogue). ``ResponseListener`` follows ``rec.responses`` and
hands each response to whoever waits for its request id. The demo, the
benchmarks and the tests use these, exactly as an application would.
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiohttp
from aiokafka import TopicPartition

from core.events import (
    CatalogItem,
    ClickEvent,
    Event,
    ImageEvent,
    RecRequest,
    RecResponse,
    SearchEvent,
)
from core.settings import Settings
from stream import kafka


def event_key(event: Event | RecRequest) -> bytes:
    if isinstance(event, CatalogItem):
        return event.item_id.encode()
    if isinstance(event, ImageEvent):
        return (event.item_id if event.purpose == "catalog_photo" else event.user_id or "").encode()
    return event.user_id.encode()  # type: ignore[union-attr]


def event_topic(settings: Settings, event: Event | RecRequest) -> str:
    kind = {
        ClickEvent: "clicks",
        SearchEvent: "searches",
        ImageEvent: "images",
        CatalogItem: "catalog",
        RecRequest: "requests",
    }[type(event)]
    return settings.topic(kind)


class EventPublisher:
    def __init__(self, settings: Settings, *, linger_ms: int = 5) -> None:
        self.settings = settings
        self._producer = kafka.producer(
            settings,
            linger_ms=linger_ms,
            max_batch_size=1 << 20,
            # Room for big (e.g. image-carrying) events; the broker's own limit still applies.
            max_request_size=32 << 20,
        )

    async def __aenter__(self) -> "EventPublisher":
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def publish(self, event: Event | RecRequest) -> asyncio.Future:
        """Queue one event; the returned future resolves when the broker has it."""
        return await self._producer.send(
            event_topic(self.settings, event), event.to_bytes(), key=event_key(event)
        )

    async def publish_raw(self, topic: str, value: bytes | None, key: bytes | None = None) -> asyncio.Future:
        return await self._producer.send(topic, value, key=key)

    async def flush(self) -> None:
        await self._producer.flush()


class ResponseListener:
    """Follows rec.responses from (about) now and resolves waiters by request id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Moved to the log end on entry; a position lost later also resumes at
        # the end, as a listener "from now" should.
        self._consumer = kafka.consumer(settings, group_id=None, auto_offset_reset="latest")
        self._waiters: dict[str, asyncio.Future[RecResponse]] = {}
        self._early: dict[str, RecResponse] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "ResponseListener":
        await self._consumer.start()
        topic = self.settings.topic("responses")
        partitions = self._consumer.partitions_for_topic(topic)
        while not partitions:
            await asyncio.sleep(0.1)
            await self._consumer._client.force_metadata_update()  # noqa: SLF001 (first metadata)
            partitions = self._consumer.partitions_for_topic(topic)
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        # The embedded broker may report an end offset a little *before* the true
        # end; reading a few old responses is harmless (they are matched by id).
        await self._consumer.seek_to_end(*assigned)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    response = RecResponse.model_validate_json(record.value)
                    waiter = self._waiters.pop(response.request_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(response)
                    else:
                        self._early[response.request_id] = response
                        if len(self._early) > 10_000:
                            self._early.pop(next(iter(self._early)))

    def expect(self, request_id: str) -> asyncio.Future[RecResponse]:
        future: asyncio.Future[RecResponse] = asyncio.get_running_loop().create_future()
        early = self._early.pop(request_id, None)
        if early is not None:
            future.set_result(early)
        else:
            self._waiters[request_id] = future
        return future


async def request_recommendations(
    settings: Settings,
    user_id: str,
    *,
    k: int = 10,
    query: str | None = None,
    timeout_s: float = 10.0,
    via_http: bool = False,
) -> RecResponse:
    request = RecRequest(request_id=uuid.uuid4().hex, user_id=user_id, k=k, query=query)
    if via_http:
        return await http_recommend(settings, request, timeout_s=timeout_s)
    async with ResponseListener(settings) as listener, EventPublisher(settings, linger_ms=0) as publisher:
        waiter = listener.expect(request.request_id)
        await publisher.publish(request)
        return await asyncio.wait_for(waiter, timeout_s)


async def http_recommend(settings: Settings, request: RecRequest, *, timeout_s: float = 10.0,
                         session: aiohttp.ClientSession | None = None) -> RecResponse:
    url = f"http://{settings.http_host}:{settings.http_port}/recommend"
    owned = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.post(url, data=request.to_bytes(),
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as reply:
            body = await reply.read()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {body[:500]!r}")
            return RecResponse.model_validate_json(body)
    finally:
        if owned:
            await session.close()
