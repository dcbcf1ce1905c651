"""How the worker and its jobs talk to Kafka: the clients, the consumer groups, the envelope.

Every client is built here, so every one gets the bootstrap servers and the
security options from settings. Consumers never commit on their own (offsets
are committed after the work they stand for is done), by default start at the
beginning of a log their group has never committed, and, in a group, use the
settings' session, heartbeat and rebalance timeouts (short ones make joins and
restarts quick on the embedded broker; see the design notes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel

from core.settings import Settings
from stream.partitions import SINGLE, Ownership

E = TypeVar("E", bound=BaseModel)


@dataclass(frozen=True)
class Delivery(Generic[E]):
    """An event and where it came from: replays are recognised by (topic, partition, offset)."""

    event: E
    topic: str
    partition: int
    offset: int


def consumer_groups(settings: Settings, ownership: Ownership = SINGLE) -> dict[str, str]:
    """The consumer group that commits each topic the worker reads (topic key -> group id).

    Faust's agents (searches, images, catalogue) commit under Faust's group: the
    app id, and with N worker processes each process's own (every process reads
    those topics whole). Clicks and requests are read by consumers of their own,
    one group whose partitions the processes split. Lag is read from these same
    groups, so a consumer must take its group here.
    """
    app_id = settings.app_id
    faust_group = ownership.group(app_id)
    return {
        "clicks": f"{app_id}.clicks",
        "searches": faust_group,
        "images": faust_group,
        "catalog": faust_group,
        "requests": f"{app_id}.requests",
    }


OWNED_TOPICS = ("clicks", "requests")  # read by partition: with N processes each reads the ones it owns


def consumer(
    settings: Settings,
    *topics: str,
    group_id: str | None,
    max_records: int | None = None,
    fetch_max_wait_ms: int | None = None,
    auto_offset_reset: str = "earliest",
    **options: Any,
) -> AIOKafkaConsumer:
    """A consumer of ``topics`` (or of partitions assigned later) that commits only when told.

    ``group_id=None`` reads without a group. ``fetch_max_wait_ms`` defaults to
    the settings' value; ``options`` go to aiokafka as they are.
    """
    group_timeouts = {} if group_id is None else dict(
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
        rebalance_timeout_ms=int(settings.rebalance_timeout_s * 1000),
    )
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_list,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        fetch_max_wait_ms=settings.fetch_max_wait_ms if fetch_max_wait_ms is None else fetch_max_wait_ms,
        max_poll_records=max_records,
        **group_timeouts,
        **options,
        **settings.kafka_client_options(),
    )


def producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    """A producer; ``options`` (``linger_ms``, batch and request sizes) go to aiokafka as they are."""
    return AIOKafkaProducer(bootstrap_servers=settings.bootstrap_list, **options, **settings.kafka_client_options())


def admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_list, **options, **settings.kafka_client_options()
    )
