"""Lag against the embedded broker: each topic's committed offsets come from its own group.

Consumers join every group the worker uses (``stream.kafka.consumer_groups``)
and commit there; ``committed_offsets`` must read back exactly those commits.
The embedded broker's end offsets are wrong for batches of more than one
record, so the topics are filled one record per batch: then ``measure_lag``
can be checked whole as well.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from core.settings import Settings, load_settings
from stream import kafka
from stream.broker import EmbeddedBroker, ensure_topics
from stream.lag import LAG_TOPICS, committed_offsets, measure_lag

pytestmark = pytest.mark.integration
RECORDS_PER_PARTITION = 10


@pytest.fixture
def lag_settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return load_settings(bootstrap_servers=broker.bootstrap, topic_prefix=f"t{tag}.", app_id=f"lag-{tag}",
                         data_dir=tmp_path / "data", partitions=2)


async def fill_topics(settings: Settings, topics: list[str]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for topic in topics:
            for partition in range(settings.partitions):
                for n in range(RECORDS_PER_PARTITION):  # one record per batch (see above)
                    await producer.send_and_wait(topic, b"%d" % n, partition=partition)
    finally:
        await producer.stop()


async def commit_as_member(settings: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Join ``group`` on the topics of ``offsets`` and commit them (the embedded broker takes commits
    from members only)."""
    consumer = kafka.consumer(settings, *sorted({tp.topic for tp in offsets}), group_id=group)
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        while consumer.assignment() != set(offsets) and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=500, max_records=1)
        assert consumer.assignment() == set(offsets), f"never held all partitions of {group}"
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


def test_committed_offsets_are_read_from_each_topics_own_group(lag_settings: Settings) -> None:
    settings = lag_settings
    groups = kafka.consumer_groups(settings)
    topics = [settings.topic(key) for key in LAG_TOPICS]
    # A different offset on every partition, so a commit read from the wrong group shows.
    expected = {TopicPartition(topic, p): 1 + (3 * n + p) % RECORDS_PER_PARTITION
                for n, topic in enumerate(topics) for p in range(settings.partitions)}
    by_group: dict[str, dict[TopicPartition, int]] = {}
    for key in LAG_TOPICS:
        topic = settings.topic(key)
        by_group.setdefault(groups[key], {}).update({tp: o for tp, o in expected.items() if tp.topic == topic})
    assert set(by_group) == {settings.app_id, f"{settings.app_id}.clicks", f"{settings.app_id}.requests"}

    async def run() -> tuple[dict[TopicPartition, int], dict[str, int]]:
        await ensure_topics(settings, topics)
        await fill_topics(settings, topics)
        await asyncio.gather(*(commit_as_member(settings, group, offsets) for group, offsets in by_group.items()))
        return await committed_offsets(settings, sorted(expected)), await measure_lag(settings)

    committed, lag = asyncio.run(run())
    assert committed == expected
    assert lag == {topic: sum(RECORDS_PER_PARTITION - o for tp, o in expected.items() if tp.topic == topic)
                   for topic in topics}
