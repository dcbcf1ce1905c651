"""Fine-tuning, promotion, rejection and hot swap against the real broker and store.

A small base model is trained on synthetic sequences where every user walks the
catalogue one item at a time; the stream then walks it seven at a time. A
fine-tuned candidate learns the new pattern and is promoted; one trained with
a destructive learning rate is rejected. A worker's services swap to the new
version while requests keep coming, and refuse a corrupt version.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from core.events import CatalogItem, ClickEvent, ModelUpdate, RecRequest
from core.settings import Settings, load_settings
from exporter.metrics import Metrics
from finetune.job import InteractionLog, run_cycle
from stream.broker import EmbeddedBroker, ensure_topics
from stream.catalog import apply_catalog
from stream.recommend import recommend
from stream.services import Services
from stream.swap import hot_swap, listen_for_updates
from tests.integration.helpers import publish, read_topic
from tests.integration.synthetic import (
    LENGTH,
    N_ITEMS,
    N_USERS,
    T0,
    registry_with,
    walk,
)


def stream_clicks(step: int = 7, seed: int = 1) -> list[ClickEvent]:
    rng = np.random.default_rng(seed)
    events = []
    for user in range(N_USERS):
        for k, item in enumerate(walk(int(rng.integers(1, N_ITEMS + 1)), step)):
            events.append(ClickEvent(event_id=f"c{seed}-{user}-{k}", event_time=T0 + 60 * k + user,
                                     user_id=f"u{user}", item_id=f"i{item}", action="purchase"))
    return events


@pytest.fixture
def fine_settings(broker: EmbeddedBroker, models_dir: Path, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        bootstrap_servers=broker.bootstrap, topic_prefix=f"t{tag}.", app_id=f"ft-{tag}",
        data_dir=tmp_path / "data", model_dir=tmp_path / "models", partitions=2,
        finetune_epochs=10, finetune_minutes=0.3, finetune_learning_rate=1e-3,
    )
    asyncio.run(ensure_topics(settings))
    return settings


def test_cycle_promotes_a_better_model_and_rejects_a_worse_one(
    fine_settings: Settings, base_artefact: Path, models_dir: Path
) -> None:
    registry = registry_with(base_artefact, fine_settings.models_path, models_dir / "towers")
    base_version = registry.current_version()
    publish(fine_settings, stream_clicks())
    metrics = Metrics(CollectorRegistry())

    promoted = run_cycle(fine_settings, metrics)
    assert promoted.decision == "promoted", promoted.reason
    assert promoted.interactions == N_USERS * LENGTH and promoted.users == N_USERS
    assert promoted.candidate_metrics["ndcg@10"] > promoted.serving_metrics["ndcg@10"]
    assert registry.current_version() == promoted.candidate_version != base_version
    manifest = registry.verify(promoted.candidate_version)
    assert manifest["parent"] == base_version
    assert manifest["metrics"]["parent_heldout"] == promoted.serving_metrics
    update = ModelUpdate.model_validate_json(read_topic(fine_settings, fine_settings.topic("model_updates"), 1)[0])
    assert update.version == promoted.candidate_version
    assert metrics.registry.get_sample_value("streamrec_finetune_decisions_total", {"decision": "promoted"}) == 1
    assert metrics.registry.get_sample_value(
        "streamrec_finetune_heldout_metric", {"model": "candidate", "metric": "ndcg@10"}
    ) == pytest.approx(promoted.candidate_metrics["ndcg@10"])

    # Nothing new on the topics: the group's offsets were committed, so the log
    # is not read twice. A destructive learning rate must not be promoted.
    wrecking = fine_settings.model_copy(update={"finetune_learning_rate": 1.0})
    rejected = run_cycle(wrecking, metrics)
    assert rejected.interactions == N_USERS * LENGTH
    assert rejected.decision == "rejected", rejected.reason
    assert rejected.candidate_metrics["ndcg@10"] < rejected.serving_metrics["ndcg@10"]
    assert registry.current_version() == promoted.candidate_version
    assert not registry.path(rejected.candidate_version).exists()
    decisions = (fine_settings.data_dir / "finetune" / "decisions.jsonl").read_text().splitlines()
    assert [json.loads(line)["decision"] for line in decisions] == ["promoted", "rejected"]


class Load:
    """Recommendation requests in a loop on another thread, as a worker's request path runs them."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            request = RecRequest(request_id=f"r{n}", user_id=f"u{n % 50}", k=10)
            try:
                response = recommend(self.services, request, path="test")
                if len(response.items) != 10:
                    self.failures.append(f"{len(response.items)} items")
                self.versions.append(response.model_version)
            except Exception as error:  # every failure is what this test looks for
                self.failures.append(repr(error))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_for(condition, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_worker_hot_swaps_without_failed_requests_and_refuses_a_corrupt_model(
    fine_settings: Settings, base_artefact: Path, models_dir: Path
) -> None:
    registry = registry_with(base_artefact, fine_settings.models_path, models_dir / "towers")
    base_version = registry.current_version()
    services = Services.open(fine_settings, CollectorRegistry())
    try:
        assert services.model.version == base_version
        apply_catalog(services, [
            CatalogItem(event_id=f"cat{i}", event_time=T0, item_id=f"i{i}", title=f"item number {i}",
                        category=f"c{i % 10}", price=float(i))
            for i in range(1, N_ITEMS + 1)
        ])
        from stream.users import Delivery, apply_interactions

        clicks = stream_clicks(seed=3)[: 50 * LENGTH]
        apply_interactions(services, [Delivery(c, "events.clicks", 0, n) for n, c in enumerate(clicks)])
        # A better model appears in the registry (promoted by the fine-tuner).
        InteractionLog(fine_settings.data_dir / "finetune", 10_000).append([
            {"e": c.event_id, "t": c.event_time, "u": c.user_id, "i": c.item_id, "a": 4} for c in stream_clicks()
        ])
        decision = run_cycle(fine_settings, drain=False, publish=False)
        assert decision.decision == "promoted", decision.reason
        new_version = decision.candidate_version

        async def swap_on_update() -> None:
            stop = asyncio.Event()
            listener = asyncio.create_task(listen_for_updates(services, stop))
            update = ModelUpdate(version=new_version, path=str(registry.path(new_version)), promoted_at=time.time())
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(bootstrap_servers=fine_settings.bootstrap_list)
            await producer.start()
            await producer.send_and_wait(fine_settings.topic("model_updates"), update.to_bytes())
            await producer.stop()
            deadline = time.monotonic() + 120
            while services.model.version != new_version and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # Requests keep running on the new version: wait for five answered by it.
            while load.versions.count(new_version) < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await listener

        with Load(services) as load:
            wait_for(lambda: len(load.versions) >= 5)
            asyncio.run(swap_on_update())
        assert services.model.version == new_version
        assert load.failures == []
        assert base_version in load.versions and new_version in load.versions
        first_new = load.versions.index(new_version)
        assert set(load.versions[first_new:]) == {new_version}  # once swapped, never back
        assert services.collections.items.endswith(new_version.replace(".", "_"))
        assert services.store.count(services.collections.items) == N_ITEMS
        assert services.metrics.registry.get_sample_value("streamrec_model_swaps_total", {"outcome": "ok"}) == 1

        # The base version comes back through a rollback, but its files were damaged.
        assert registry.rollback() == base_version
        (registry.path(base_version) / "ranker.onnx").write_bytes(b"not a model")
        with Load(services) as load:
            wait_for(lambda: len(load.versions) >= 5)
            assert asyncio.run(hot_swap(services)) is False
            wait_for(lambda: len(load.versions) >= 10)
        assert services.model.version == new_version
        assert load.failures == [] and set(load.versions) == {new_version}
        assert services.metrics.registry.get_sample_value("streamrec_model_swaps_total", {"outcome": "refused"}) == 1
    finally:
        services.close()
