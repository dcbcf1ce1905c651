"""``streamrec bench broker``: what a record costs the broker as its topic grows.

A replay that must see each event applied before the next request (the
prequential bench on MovieLens) publishes one record per batch for hours. This
measures that pattern on its own: one producer sends ``--records`` records one
at a time (linger 0, each awaited), keyed over ``--partitions`` partitions,
while a group consumer, joined before the first send, reads along
(``--no-consumer`` leaves it out). Every ``--every`` records it prints the
wall time per send, the records consumed so far and the broker's CPU (from
``/proc/<pid>/stat``, user + system, as a share of one core) over that
segment; the JSON line holds every segment and ``consumed``, the records read
back once the consumer caught up.

    streamrec bench broker --records 100000 --every 20000 --partitions 4

The broker is the embedded one by default; ``--bootstrap HOST:PORT`` measures
another (its CPU is then not read).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import (
    bench_parser,
    process_cpu_seconds,
    report,
    start_broker,
    work_dir,
)
from core.errors import ConfigError, StreamrecError

TOPIC_PREFIX = "bench-broker-"  # a new topic per run: an outside broker may hold earlier ones
VALUE_BYTES = 100
KEYS = 997  # distinct keys, spread over the partitions
WAIT_S = 60.0  # for the consumer's group join, and for it to catch up at the end


@dataclass(frozen=True)
class Segment:
    sent: int
    consumed: int
    ms_per_send: float
    broker_cpu_share: float | None  # CPU seconds per wall second over the segment; None when not read

    @property
    def broker_cpu_ms_per_record(self) -> float | None:
        """Broker CPU per record sent: less bent than wall time by other work on the machine."""
        return None if self.broker_cpu_share is None else round(self.broker_cpu_share * self.ms_per_send, 3)


async def measure(bootstrap: str, records: int, every: int, partitions: int, consume: bool,
                  broker_pid: int | None) -> tuple[list[Segment], int]:
    """The segments, and the records consumed once the consumer caught up (or ``WAIT_S`` passed)."""
    topic = f"{TOPIC_PREFIX}{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    consumer = None
    consumed = 0

    async def read_along(consumer: AIOKafkaConsumer) -> None:
        nonlocal consumed
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            consumed += sum(len(batch) for batch in batches.values())

    reader = None
    segments: list[Segment] = []
    cpu = (lambda: process_cpu_seconds(broker_pid)) if broker_pid else (lambda: 0.0)
    try:
        if consume:
            # The consumer joins its group first, so it reads along from the first record.
            consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=topic,
                                        auto_offset_reset="earliest")
            await consumer.start()
            deadline = time.monotonic() + WAIT_S
            while len(consumer.assignment()) < partitions:
                if time.monotonic() > deadline:
                    raise StreamrecError(f"the consumer got no assignment of {topic} in {WAIT_S:g} s")
                await consumer.getmany(timeout_ms=100)
            reader = asyncio.create_task(read_along(consumer))
        started, cpu_started = time.monotonic(), cpu()
        for n in range(1, records + 1):
            await producer.send_and_wait(topic, b"x" * VALUE_BYTES, key=str(n % KEYS).encode())
            if n % every == 0:
                now, cpu_now = time.monotonic(), cpu()
                share = round((cpu_now - cpu_started) / (now - started), 3) if broker_pid else None
                segments.append(Segment(n, consumed, round(1000 * (now - started) / every, 3), share))
                segment = segments[-1]
                print(f"  {n} sent, {consumed} consumed: {segment.ms_per_send:.2f} ms per send, broker CPU "
                      + ("-" if share is None else f"{100 * share:.0f}%, {segment.broker_cpu_ms_per_record:.2f} ms "
                         "per record"), flush=True)
                started, cpu_started = now, cpu_now
        deadline = time.monotonic() + WAIT_S
        while reader is not None and consumed < records and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if consumer is not None:
            await consumer.stop()
        await producer.stop()
    return segments, consumed


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("broker", __doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000, help="records per printed segment")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--no-consumer", action="store_true", help="produce only")
    parser.add_argument("--bootstrap", default=None, help="measure this broker instead of an embedded one")
    args = parser.parse_args(argv)
    if args.records < 1 or args.every < 1 or args.partitions < 1:
        raise ConfigError("--records, --every and --partitions must be at least 1")
    with work_dir(args.work_dir, "broker") as folder:
        broker = None if args.bootstrap else start_broker(Path(folder))
        try:
            bootstrap = args.bootstrap or broker.bootstrap  # type: ignore[union-attr]
            segments, consumed = asyncio.run(measure(bootstrap, args.records, min(args.every, args.records),
                                                     args.partitions, not args.no_consumer,
                                                     None if broker is None else broker.pid))
        finally:
            if broker is not None:
                broker.stop()
    report("broker cost per record (one record per batch)", {
        "records": args.records, "partitions": args.partitions, "consumer": not args.no_consumer,
        "embedded_broker": args.bootstrap is None,
        "consumed": consumed,
        "first_ms_per_send": segments[0].ms_per_send, "last_ms_per_send": segments[-1].ms_per_send,
        "first_broker_cpu_ms_per_record": segments[0].broker_cpu_ms_per_record,
        "last_broker_cpu_ms_per_record": segments[-1].broker_cpu_ms_per_record,
        "segments": [{**asdict(segment), "broker_cpu_ms_per_record": segment.broker_cpu_ms_per_record}
                     for segment in segments],
    })
    return 0
