"""signals.lessons: worker processes share what their clicks taught trending and co-visits.

With one process there is nothing to share. With N, each process sends the
lessons of the click batches it applies (``SignalLog.share``) and learns every
other process's (``SignalLog.learn_from_peers``), so trending and co-visits
learn from every click whichever process applied it (``stream.signals``
describes why each lesson is learnt exactly once). The topic has one
partition: every process reads all of it, under a group of its own, and
commits only after the lessons are in its log.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import faust
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Gauge

from core.errors import StoreUnavailableError
from core.settings import Settings
from stream import kafka
from stream.agents.base import run_consumer
from stream.partitions import Ownership
from stream.services import Services

log = logging.getLogger(__name__)
RETRY_INTERVAL_S = 1.0
SEND_TIMEOUT_S = 30.0
MAX_LESSONS_PER_POLL = 256
# Lessons may reach the other processes a little later than clicks are applied
# (trending and co-visits steer candidates, not the user's own state); an idle
# fetch every 50 ms costs a tenth of one every 5 ms on the embedded broker.
LESSONS_FETCH_WAIT_MS = 50
# A send's lessons go out as one record batch after this linger, and what is left
# pending meanwhile goes with the next send: about one record batch per 0.1 s.
# One per click batch slowed the embedded broker's single lessons partition until
# two processes' freshness p99 tripled within three minutes (docs/performance.md,
# "Lessons without the wait").
LESSONS_LINGER_MS = 100


def lessons_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}signals.lessons"


async def ensure_lessons_topic(settings: Settings) -> None:
    admin = kafka.admin(settings)
    await admin.start()
    try:
        if lessons_topic(settings) in set(await admin.list_topics()):
            return
        try:
            await admin.create_topics([NewTopic(name=lessons_topic(settings), num_partitions=1,
                                                 replication_factor=settings.replication_factor)])
        except TopicAlreadyExistsError:
            pass
    finally:
        await admin.close()


class ExchangeGauges:
    """Where the exchange stands, for whoever must know that every lesson has arrived.

    ``streamrec_signal_lessons_seq{process="j"}``: in process j itself, the seq
    of the newest lesson it sent; in any other, the newest it learnt from j. The
    processes have exchanged everything when those agree and no process has
    ``streamrec_signal_lessons_unsent`` above 0. A peer's series appears with its first lesson.
    """

    def __init__(self, services: Services, origin: int) -> None:
        registry = services.metrics.registry
        self.seq = Gauge("streamrec_signal_lessons_seq", "Newest lesson seq sent (own process) or learnt (peer)",
                         ["process"], registry=registry)
        self.unsent = Gauge("streamrec_signal_lessons_unsent", "Own lessons the broker has not acknowledged yet",
                            registry=registry)
        signals = services.signals
        # Read when scraped (without the log's lock, which a batch may hold while it sends).
        self.seq.labels(str(origin)).set_function(lambda: signals.sent_seq)
        self.unsent.set_function(lambda: signals.unsent_count)
        self._signals, self._peers = signals, {origin}

    def learnt_from(self, origins: set[int]) -> None:
        """A series for each peer heard from (a peer's series appears with its first lesson)."""
        for peer in origins - self._peers:
            self._peers.add(peer)
            self.seq.labels(str(peer)).set_function(lambda peer=peer: self._signals.peer_seq(peer))


async def exchange_lessons(services: Services, origin: int, stop: asyncio.Event, ready: asyncio.Event) -> None:
    settings = services.settings
    gauges = ExchangeGauges(services, origin)
    topic = lessons_topic(settings)
    producer = kafka.producer(settings, linger_ms=LESSONS_LINGER_MS)
    await producer.start()
    loop = asyncio.get_running_loop()
    pending = asyncio.Event()
    key = str(origin).encode()

    async def send_all(values: list[bytes]) -> None:
        sent = [await producer.send(topic, value, key=key) for value in values]
        await asyncio.gather(*sent)

    def wake() -> None:  # called from the threads that apply click batches
        loop.call_soon_threadsafe(pending.set)

    async def handle(records: list[ConsumerRecord]) -> None:
        lessons = []
        for record in records:
            try:
                lessons.append(json.loads(record.value))
            except (TypeError, ValueError) as error:
                log.error("%s offset %d is not a lesson (%s); skipped", topic, record.offset, error)
        delay = 0.1
        while True:
            try:
                async with services.write_lock:
                    await asyncio.to_thread(services.signals.learn_from_peers, lessons)
                break
            except StoreUnavailableError as exc:  # lessons learnt before the failure are skipped next time
                log.warning("store unavailable (%s); learning the peers' lessons again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        gauges.learnt_from({int(lesson["origin"]) for lesson in lessons})

    async def send_pending() -> None:
        """Whenever a batch leaves a lesson (and every second, for those the broker refused).

        No thread waits for the broker (the log's lock, which a batch holds while it
        stores its users, is taken in one); one send at a time keeps the order.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.wait(), RETRY_INTERVAL_S)
            pending.clear()
            seq, values = await asyncio.to_thread(services.signals.pending)
            if not values:
                continue
            try:
                await asyncio.wait_for(send_all(values), SEND_TIMEOUT_S)
            except Exception as error:  # kept pending, and sent with the next round
                log.warning("%d signal lessons not shared with the other processes yet (%s)", len(values), error)
                continue
            await asyncio.to_thread(services.signals.acknowledged, seq)

    services.signals.on_pending(wake)
    pending.set()  # what a restart left pending goes out first
    sender = asyncio.create_task(send_pending())
    consumer = kafka.consumer(settings, group_id=f"{settings.app_id}.lessons.{origin}",
                              max_records=MAX_LESSONS_PER_POLL, fetch_max_wait_ms=LESSONS_FETCH_WAIT_MS)
    try:
        await run_consumer(consumer, handle, stop, name="lesson", ready=ready,
                           assign=[TopicPartition(topic, 0)])
    finally:
        sender.cancel()
        await producer.stop()


def attach(app: faust.App, services: Services, ownership: Ownership) -> asyncio.Event:
    """Share lessons with the peers (the other processes, or the other workers with a
    ``STREAMREC_REPLICA`` of their own); the returned event is set once their lessons are read
    (at once for a single worker, which has no peers)."""
    ready = asyncio.Event()
    origin = services.settings.replica
    if origin is None:
        ready.set()
        return ready
    services.signals.share(origin)
    stop = asyncio.Event()

    @app.task
    async def lesson_exchange() -> None:
        await exchange_lessons(services, origin, stop, ready)

    @app.on_before_shutdown.connect
    async def stop_lesson_exchange(app: faust.App, **_: object) -> None:
        stop.set()

    return ready
