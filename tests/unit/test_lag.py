"""Consumer lag arithmetic (the broker calls are exercised against Apache Kafka only)."""
from aiokafka import TopicPartition

from stream.lag import lag_by_topic


def test_lag_sums_partitions_per_topic_and_never_goes_negative() -> None:
    a0, a1, b0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)
    end = {a0: 100, a1: 50, b0: 7}
    committed = {a0: 90, a1: 60}  # a1 committed past a stale end: counts 0, not -10
    assert lag_by_topic(end, committed) == {"a": 10, "b": 7}


def test_no_partitions_no_lag() -> None:
    assert lag_by_topic({}, {}) == {}
