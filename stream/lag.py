"""Consumer lag per topic: log end offset minus committed offset, summed over partitions.

With N worker processes each process reports its own (``streamrec_consumer_lag``
on the shared port carries a ``worker_process`` label per process): the click
and request partitions it owns, and the topics every process reads whole.

Only meaningful where the broker reports true end offsets (Apache Kafka). The
embedded broker does not (see the design notes), so there the gauge reads -1,
"unavailable", instead of a wrong number.
"""
from __future__ import annotations

from collections.abc import Mapping

from aiokafka import TopicPartition

from core.settings import Settings
from stream import kafka
from stream.partitions import SINGLE, Ownership

LAG_TOPICS = ("clicks", "searches", "images", "catalog", "requests")


def lag_by_topic(end: Mapping[TopicPartition, int], committed: Mapping[TopicPartition, int]) -> dict[str, int]:
    """Sum over partitions of end - committed (a partition never committed counts whole)."""
    lag: dict[str, int] = {}
    for tp, end_offset in end.items():
        behind = max(0, end_offset - committed.get(tp, 0))
        lag[tp.topic] = lag.get(tp.topic, 0) + behind
    return lag


async def measure_lag(settings: Settings, ownership: Ownership = SINGLE) -> dict[str, int]:
    """This process's lag per topic: with N worker processes, the partitions of clicks and
    requests it owns and the other topics whole, each in the group this process commits to."""
    topics = [settings.topic(key) for key in LAG_TOPICS]
    owned = {settings.topic(key) for key in kafka.OWNED_TOPICS}
    consumer = kafka.consumer(settings, group_id=None)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p) for topic in topics for p in (consumer.partitions_for_topic(topic) or ())
            if topic not in owned or ownership.owns(p)
        ]
        # Committed before end: a commit landing in between then cannot pass the end read.
        committed = await committed_offsets(settings, partitions, ownership)
        end = await consumer.end_offsets(partitions) if partitions else {}
    finally:
        await consumer.stop()
    lag = lag_by_topic(end, committed)
    return {topic: lag.get(topic, 0) for topic in topics}


async def committed_offsets(settings: Settings, partitions: list[TopicPartition],
                            ownership: Ownership = SINGLE) -> dict[TopicPartition, int]:
    """The committed offset of each of ``partitions`` (of lag topics) in the group that consumes its
    topic (in process ``ownership.index`` of N).

    Partitions the group never committed are left out.
    """
    groups = kafka.consumer_groups(settings, ownership)
    key_of_topic = {settings.topic(key): key for key in groups}
    partitions_of_group: dict[str, list[TopicPartition]] = {}
    for tp in partitions:
        partitions_of_group.setdefault(groups[key_of_topic[tp.topic]], []).append(tp)
    admin = kafka.admin(settings)
    await admin.start()
    try:
        committed: dict[TopicPartition, int] = {}
        for group, asked in partitions_of_group.items():
            # Partitions named explicitly: the embedded broker cannot answer "all of the group's".
            offsets = await admin.list_consumer_group_offsets(group, partitions=asked)
            committed.update({tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0})
        return committed
    finally:
        await admin.close()
