"""Builds the Faust app of a worker: topics, agents, HTTP endpoint, health checks."""
from __future__ import annotations

import asyncio
import logging

import faust

from core.errors import ConfigError
from core.settings import Settings
from stream import kafka, swap
from stream.agents import catalog, clicks, images, lessons, recommend, searches
from stream.agents.base import DeadLetters
from stream.gc_policy import run_policy
from stream.http_api import HealthState, serve_http
from stream.lag import LAG_TOPICS, measure_lag
from stream.loop_watch import watch_loop
from stream.partitions import SINGLE, Ownership
from stream.services import Services
from stream.topics import Topics

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 1.0
LAG_INTERVAL_S = 10.0
DRIFT_INTERVAL_S = 10.0


def faust_options(settings: Settings) -> dict[str, object]:
    options: dict[str, object] = dict(
        broker=[f"kafka://{host}" for host in settings.bootstrap_list],
        store="memory://",
        # Faust's own folder (table state; unused with memory tables) under the data
        # dir, not "<app id>-data" in whatever directory the worker started in.
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_commit_every=settings.batch_size,
        broker_commit_interval=1.0,
        producer_linger_ms=1,
        web_enabled=False,
        stream_wait_empty=True,
    )
    if settings.sasl_mechanism:
        options["broker_credentials"] = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=settings.kafka_client_options().get("ssl_context"),  # type: ignore[arg-type]
        )
    elif settings.security_protocol == "SSL":
        options["broker_credentials"] = faust.SSLCredentials(
            settings.kafka_client_options()["ssl_context"]  # type: ignore[arg-type]
        )
    return options


def cap_fetch_wait(max_wait_ms: int) -> None:
    """Bound how long a consumer fetch waits for data before returning.

    faust-streaming builds its aiokafka consumer with a fixed 1.5 s fetch wait;
    measured against the embedded broker that adds ~0.7 s to every request
    that arrives on an idle topic. The value is applied before the consumer
    starts (it is read when the fetcher is created).
    """
    from faust.transport.drivers import aiokafka as driver

    create = driver.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "max_wait_ms", None) == max_wait_ms:
        return
    original = getattr(create, "original", create)

    def create_with_cap(self, transport):  # type: ignore[no-untyped-def]
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms  # noqa: SLF001 (no public setting)
        return consumer

    create_with_cap.original = original  # type: ignore[attr-defined]
    create_with_cap.max_wait_ms = max_wait_ms  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._create_worker_consumer = create_with_cap


async def topic_partitions(settings: Settings) -> int:
    """The partition count of the user-keyed topics, which must agree (they are co-partitioned)."""
    keys = ("clicks", "searches", "requests")
    consumer = kafka.consumer(settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()  # fetches the metadata of every topic
        counts = {settings.topic(key): len(consumer.partitions_for_topic(settings.topic(key)) or ())
                  for key in keys}
    finally:
        await consumer.stop()
    missing = [topic for topic, count in counts.items() if not count]
    if missing:
        raise ConfigError(f"topic(s) {', '.join(missing)} do not exist: run `streamrec broker` or create them")
    if len(set(counts.values())) != 1:
        raise ConfigError(
            "events.clicks, events.searches and rec.requests must have the same number of partitions "
            f"(a user's events and requests meet in one process), but have {counts}: recreate them with "
            "STREAMREC_PARTITIONS partitions each")
    return next(iter(counts.values()))


def create_app(settings: Settings, services: Services, ownership: Ownership = SINGLE,
               *, partitions: int = 0) -> faust.App:
    """The app of one worker process; ``partitions`` (of the user-keyed topics) is needed with N > 1."""
    cap_fetch_wait(settings.catalog_fetch_max_wait_ms)  # Faust's consumer: the catalogue, photos and searches
    # The catalogue and photos are read whole by every process: each under a group of its own.
    app = faust.App(ownership.group(settings.app_id), **faust_options(settings))
    topics = Topics.declare(app, settings)
    dead_letters = DeadLetters.via_faust(services, topics)
    for agent_module in (catalog, searches, images):
        agent_module.attach(app, topics, services, dead_letters, ownership)
    clicks.attach(app, topics, services, dead_letters, ownership, partitions)
    requests_ready = recommend.attach(app, topics, services, dead_letters, ownership, partitions)
    swap.attach(app, services)
    lessons_ready = lessons.attach(app, services, ownership)
    health = HealthState(services)

    @app.task
    async def start_http() -> None:
        runner = await serve_http(services, health, ownership, partitions)
        log.info("HTTP on http://%s:%d", settings.http_host, settings.http_port)
        app.http_runner = runner  # type: ignore[attr-defined]

    background_stop = asyncio.Event()

    @app.task
    async def loop_lag() -> None:
        await watch_loop(services.metrics, background_stop, dump_after_ms=settings.loop_stall_dump_ms)

    @app.task
    async def garbage_collector() -> None:
        await run_policy(services.metrics, background_stop, freeze_s=settings.gc_freeze_s,
                         full_s=settings.gc_full_s)

    @app.on_before_shutdown.connect
    async def stop_loop_lag(app: faust.App, **_: object) -> None:
        background_stop.set()

    @app.timer(HEALTH_INTERVAL_S)
    async def check_health() -> None:
        ready = bool(app.consumer.assignment()) and requests_ready.is_set() and lessons_ready.is_set()
        await _check_health(settings, services, health, ready=ready)

    @app.timer(DRIFT_INTERVAL_S)
    async def drift_gauges() -> None:
        services.metrics.set_drift(services.drift.results())

    @app.timer(LAG_INTERVAL_S)
    async def lag_gauges() -> None:
        # The embedded broker's end offsets are wrong (see docs), so lag is
        # reported as unavailable (-1) there rather than as a wrong number.
        if settings.embedded_broker:
            lag = {settings.topic(key): -1 for key in LAG_TOPICS}
        else:
            try:
                lag = await measure_lag(settings, ownership)
            except Exception as exc:  # lag is advisory; the health check reports the broker
                log.warning("consumer lag unavailable: %s", exc)
                lag = {settings.topic(key): -1 for key in LAG_TOPICS}
        for topic, behind in lag.items():
            services.metrics.consumer_lag.labels(topic).set(behind)

    return app


async def _check_health(settings: Settings, services: Services, health: HealthState, *, ready: bool) -> None:
    broker_ok = store_ok = False
    details = []
    admin = kafka.admin(settings, request_timeout_ms=1500)
    try:
        await asyncio.wait_for(admin.start(), 3)
        await asyncio.wait_for(admin.list_topics(), 3)
        broker_ok = True
    except Exception as exc:  # any failure means "not reachable" for health
        details.append(f"broker: {type(exc).__name__}: {exc}")
    finally:
        try:
            await admin.close()
        except Exception:
            pass
    try:
        await asyncio.to_thread(services.store.count, services.collections.items)
        store_ok = True
    except Exception as exc:
        details.append(f"store: {type(exc).__name__}: {exc}")
    health.update(broker_ok=broker_ok, store_ok=store_ok, ready=ready and broker_ok,
                  detail="; ".join(details) or "ok")
