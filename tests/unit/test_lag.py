"""Consumer lag: the arithmetic, and which consumer group each topic's committed offsets come from.

The Kafka clients are replaced by fakes here (built through ``stream.kafka``);
tests/integration/test_lag.py reads real commits back from the embedded broker.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from core.settings import Settings, load_settings
from stream import kafka
from stream.agents.clicks import consume_clicks
from stream.agents.recommend import serve_requests
from stream.lag import LAG_TOPICS, committed_offsets, lag_by_topic, measure_lag


def test_lag_sums_partitions_per_topic_and_never_goes_negative() -> None:
    a0, a1, b0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)
    end = {a0: 100, a1: 50, b0: 7}
    committed = {a0: 90, a1: 60}  # a1 committed past a stale end: counts 0, not -10
    assert lag_by_topic(end, committed) == {"a": 10, "b": 7}


def test_no_partitions_no_lag() -> None:
    assert lag_by_topic({}, {}) == {}


class FakeCluster:
    """What the fake clients read (end and committed offsets) and what they were asked for."""

    def __init__(self) -> None:
        self.end: dict[TopicPartition, int] = {}
        self.committed: dict[str, dict[TopicPartition, int]] = {}  # group -> offsets
        self.consumers: list[tuple[tuple[str, ...], str | None]] = []  # (topics, group_id) per consumer built

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cluster = self

        class Consumer:
            def __init__(self, *topics: str, group_id: str | None, **options: object) -> None:
                cluster.consumers.append((topics, group_id))

            async def start(self) -> None: ...
            async def stop(self) -> None: ...

            def assignment(self) -> set[TopicPartition]:
                return set()

            def partitions_for_topic(self, topic: str) -> set[int] | None:
                return {tp.partition for tp in cluster.end if tp.topic == topic} or None

            async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
                return {tp: cluster.end[tp] for tp in partitions}

        class Producer:
            def __init__(self, **options: object) -> None: ...
            async def start(self) -> None: ...
            async def stop(self) -> None: ...

        class Admin:
            def __init__(self, **options: object) -> None: ...
            async def start(self) -> None: ...
            async def close(self) -> None: ...

            async def list_consumer_group_offsets(
                self, group_id: str, partitions: list[TopicPartition] | None = None,
            ) -> dict[TopicPartition, OffsetAndMetadata]:
                # As Kafka answers: every committed partition, or -1 for a named one never committed.
                committed = cluster.committed.get(group_id, {})
                asked = committed if partitions is None else partitions
                return {tp: OffsetAndMetadata(committed.get(tp, -1), "") for tp in asked}

        monkeypatch.setattr(kafka, "AIOKafkaConsumer", Consumer)
        monkeypatch.setattr(kafka, "AIOKafkaProducer", Producer)
        monkeypatch.setattr(kafka, "AIOKafkaAdminClient", Admin)


@pytest.fixture
def settings() -> Settings:
    return load_settings(app_id="shop", topic_prefix="t.")


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    fake = FakeCluster()
    fake.install(monkeypatch)
    return fake


def test_each_topic_lags_behind_the_commits_of_the_group_that_consumes_it(settings: Settings,
                                                                          cluster: FakeCluster) -> None:
    def tp(key: str, partition: int = 0) -> TopicPartition:
        return TopicPartition(settings.topic(key), partition)

    cluster.end = {tp("clicks", 0): 100, tp("clicks", 1): 50, tp("requests"): 30, tp("searches"): 20,
                   tp("images"): 5, tp("catalog"): 8}
    cluster.committed = {
        "shop.clicks": {tp("clicks", 0): 90, tp("clicks", 1): 50},  # the click agent's own consumer
        "shop.requests": {tp("requests"): 29},  # the request server's own consumer
        "shop": {tp("searches"): 15, tp("images"): 5},  # Faust's agents; the catalogue never committed
    }

    lag = asyncio.run(measure_lag(settings))

    assert lag == {settings.topic("clicks"): 10, settings.topic("requests"): 1, settings.topic("searches"): 5,
                   settings.topic("images"): 0, settings.topic("catalog"): 8}


def test_lag_reads_each_topic_from_the_group_its_agent_commits_under(settings: Settings,
                                                                       cluster: FakeCluster) -> None:
    # The direct consumers are built and stopped at once: only their groups matter here.
    services, stop = SimpleNamespace(settings=settings), asyncio.Event()
    stop.set()
    asyncio.run(consume_clicks(services, None, stop))  # type: ignore[arg-type]
    asyncio.run(serve_requests(services, stop, asyncio.Event()))  # type: ignore[arg-type]
    group_of_topic = {topic: group for topics, group in cluster.consumers for topic in topics}
    # Faust's agents commit under Faust's group, the app id (``faust.App(settings.app_id)``).
    group_of_topic |= {settings.topic(key): settings.app_id for key in ("searches", "images", "catalog")}
    assert sorted(group_of_topic) == sorted(settings.topic(key) for key in LAG_TOPICS)

    # Every group holds a commit on every topic, the offset telling the groups apart.
    offset_of_group = {group: n for n, group in enumerate(sorted(set(group_of_topic.values())), start=1)}
    partitions = [TopicPartition(topic, 0) for topic in group_of_topic]
    cluster.committed = {group: {tp: n for tp in partitions} for group, n in offset_of_group.items()}
    committed = asyncio.run(committed_offsets(settings, partitions))

    group_read = {tp.topic: group for tp, n in committed.items() for group, m in offset_of_group.items() if n == m}
    assert group_read == group_of_topic
    assert group_of_topic[settings.topic("clicks")] == "shop.clicks"
    assert group_of_topic[settings.topic("requests")] == "shop.requests"


def test_each_of_two_processes_reports_the_partitions_it_owns_and_its_own_faust_group(
        settings: Settings, cluster: FakeCluster) -> None:
    from stream.partitions import Ownership

    def tp(key: str, partition: int) -> TopicPartition:
        return TopicPartition(settings.topic(key), partition)

    cluster.end = {tp(key, p): 100 for key in LAG_TOPICS for p in range(4)}
    shared = {tp(key, p): 100 - (10 * p + 1) for key in ("clicks", "requests") for p in range(4)}
    cluster.committed = {
        "shop.clicks": {k: v for k, v in shared.items() if k.topic == settings.topic("clicks")},
        "shop.requests": {k: v for k, v in shared.items() if k.topic == settings.topic("requests")},
        # Each process's Faust group reads searches, images and the catalogue whole.
        "shop.p0": {tp(key, p): 98 for key in ("searches", "images", "catalog") for p in range(4)},
        "shop.p1": {tp(key, p): 97 for key in ("searches", "images", "catalog") for p in range(4)},
        "shop": {tp(key, p): 0 for key in ("searches", "images", "catalog") for p in range(4)},  # a single worker's
    }
    first = asyncio.run(measure_lag(settings, Ownership(0, 2)))
    second = asyncio.run(measure_lag(settings, Ownership(1, 2)))
    # Process 0 owns partitions 0 and 2 (lag 1 + 21), process 1 partitions 1 and 3 (11 + 31).
    assert first[settings.topic("clicks")] == 22 and second[settings.topic("clicks")] == 42
    assert first[settings.topic("requests")] == 22 and second[settings.topic("requests")] == 42
    for key in ("searches", "images", "catalog"):
        assert first[settings.topic(key)] == 8 and second[settings.topic(key)] == 12
    # One process alone: every partition, Faust's group being the app id.
    single = asyncio.run(measure_lag(settings))
    assert single[settings.topic("clicks")] == 64 and single[settings.topic("catalog")] == 400
