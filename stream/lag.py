"""Consumer lag per topic: log end offset minus committed offset, summed over partitions.

Only meaningful where the broker reports true end offsets (Apache Kafka). The
embedded broker does not (see the design notes), so there the gauge reads -1,
"unavailable", instead of a wrong number.
"""
from __future__ import annotations

from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings

LAG_TOPICS = ("clicks", "searches", "images", "catalog", "requests")


def lag_by_topic(end: Mapping[TopicPartition, int], committed: Mapping[TopicPartition, int]) -> dict[str, int]:
    """Sum over partitions of end - committed (a partition never committed counts whole)."""
    lag: dict[str, int] = {}
    for tp, end_offset in end.items():
        behind = max(0, end_offset - committed.get(tp, 0))
        lag[tp.topic] = lag.get(tp.topic, 0) + behind
    return lag


async def measure_lag(settings: Settings) -> dict[str, int]:
    topics = [settings.topic(key) for key in LAG_TOPICS]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_list, **settings.kafka_client_options())
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_list, group_id=None,
                                **settings.kafka_client_options())
    await admin.start()
    await consumer.start()
    try:
        committed: dict[TopicPartition, int] = {}
        # Faust's group holds the event topics; the request server has its own group.
        for group in (settings.app_id, f"{settings.app_id}.requests"):
            offsets = await admin.list_consumer_group_offsets(group)
            committed.update({tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0})
        partitions = [
            TopicPartition(topic, p) for topic in topics for p in (consumer.partitions_for_topic(topic) or ())
        ]
        end = await consumer.end_offsets(partitions) if partitions else {}
        return {topic: lag_by_topic(end, committed).get(topic, 0) for topic in topics}
    finally:
        await consumer.stop()
        await admin.close()
