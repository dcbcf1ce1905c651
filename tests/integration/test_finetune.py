"""Fine-tuning, promotion, rejection and hot swap against the real broker and store.

A small base model is trained on synthetic sequences where every user walks the
catalogue one item at a time; the stream then walks it seven at a time. A
fine-tuned candidate learns the new pattern and is promoted; one trained with
a destructive learning rate is rejected. A worker's services swap to the new
version while requests keep coming, and refuse a corrupt version; a worker that
was down during a promotion rebuilds its vectors when it starts. After either,
every item and user vector is the one the new version computes.
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
from model.serving.contract import ItemContent, compose_text
from model.serving.rule_model import RULE_VERSION
from stream.broker import EmbeddedBroker, ensure_topics
from stream.catalog import apply_catalog
from stream.recommend import recommend
from stream.services import Services
from stream.store import Hit
from stream.swap import hot_swap, listen_for_updates, reconcile
from stream.user_table import OwnTable, PeerTables, remove_tables, table_path
from stream.users import UserState, user_vectors
from stream.versions import read_pointer, version_collections
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


def catalogue() -> list[CatalogItem]:
    return [
        CatalogItem(event_id=f"cat{i}", event_time=T0, item_id=f"i{i}", title=f"item number {i}",
                    category=f"c{i % 10}", price=float(i))
        for i in range(1, N_ITEMS + 1)
    ]


def stored_users(services: Services, users: str) -> dict[str, Hit]:
    store = services.store
    return store.retrieve(users, sorted(store.scroll_ids(users)), with_vectors=True)


def assert_users_follow_the_served_model(services: Services, previous_users: str) -> dict[str, Hit]:
    """Every user of ``previous_users`` is in the served users collection with the same sequence and
    the vector the served model computes from it; returns the served collection's users."""
    before, after = stored_users(services, previous_users), stored_users(services, services.collections.users)
    assert before and sorted(after) == sorted(before)
    states = [UserState.from_payload(user_id, hit.payload) for user_id, hit in after.items()]
    for state in states:
        assert (state.items, state.actions) == (before[state.user_id].payload["items"],
                                                before[state.user_id].payload["actions"])
    expected = user_vectors(services, states)  # (U, fused_dim): the served item vectors and user tower
    for state, vector in zip(states, expected):
        np.testing.assert_allclose(after[state.user_id].vectors["user"], vector, rtol=1e-5, atol=1e-6,
                                   err_msg=state.user_id)
    return after


def assert_items_follow_the_served_model(services: Services, text: dict[str, np.ndarray]) -> dict[str, Hit]:
    """Every catalogue item is in the served items collection with the fused vector the served
    model computes from ``text`` (item id -> the text vector it should have read); returns them."""
    item_ids = [item.item_id for item in catalogue()]
    store, model = services.store, services.model
    assert sorted(store.scroll_ids(services.collections.items)) == sorted(item_ids)
    hits = store.retrieve(services.collections.items, item_ids, with_vectors=True)
    content = ItemContent(
        item_ids=item_ids,
        text=np.stack([text[item_id] for item_id in item_ids]),  # (N, text_dim)
        image=np.zeros((len(item_ids), model.image_dim), np.float32),  # no photos
        has_text=np.ones(len(item_ids), bool),
        has_image=np.zeros(len(item_ids), bool),
        categories=[str(hits[item_id].payload["category"]) for item_id in item_ids],
    )
    expected = model.item_vectors(content)  # (N, fused_dim)
    for item_id, vector in zip(item_ids, expected):
        np.testing.assert_allclose(hits[item_id].vectors["fused"], vector, rtol=1e-5, atol=1e-6, err_msg=item_id)
    return hits


def assert_personal_answer_scored_with(services: Services, user_id: str, user_vector: np.ndarray,
                                       other_vector: np.ndarray) -> None:
    """A request for ``user_id`` is answered by the served model, scored with ``user_vector``
    (recomputed here from the served items) and not with ``other_vector``; nothing seen comes back."""
    response = recommend(services, RecRequest(request_id=f"check-{user_id}", user_id=user_id, k=10), path="test")
    model, store = services.model, services.store
    assert response.model_version == model.version
    served = [item.item_id for item in response.items]
    state = UserState.from_payload(user_id, store.retrieve(services.collections.users, [user_id])[user_id].payload)
    assert len(served) == 10 and not set(served) & set(state.items), served
    fill = [item.reason for item in response.items if item.reason.startswith(("trending", "from the catalogue"))]
    assert not fill, fill
    hits = store.retrieve(services.collections.items, served, with_vectors=["fused", "text", "image"])
    found = [hits[item_id] for item_id in served]
    fused = np.stack([hit.vectors["fused"] for hit in found])  # (10, fused_dim)
    text = np.stack([hit.vectors["text"] for hit in found])  # (10, text_dim); every item has a title
    image = np.zeros((len(found), model.image_dim), np.float32)  # no photos
    assert not any("image" in hit.vectors for hit in found)

    def scores_with(vector: np.ndarray) -> np.ndarray:
        # Every unseen item is a candidate of the personal search (500 of 200), scored by dot product.
        context = model.context_features(served, fused @ vector, state.last_event_time)
        return model.score(vector, None, fused, text, image, context)

    answered = np.array([item.score for item in response.items])
    np.testing.assert_allclose(answered, scores_with(user_vector), atol=1e-4)
    assert np.abs(answered - scores_with(other_vector)).max() > 1e-3


def test_worker_hot_swaps_without_failed_requests_and_refuses_a_corrupt_model(
    fine_settings: Settings, base_artefact: Path, models_dir: Path
) -> None:
    registry = registry_with(base_artefact, fine_settings.models_path, models_dir / "towers")
    base_version = registry.current_version()
    services = Services.open(fine_settings, CollectorRegistry())
    # As process 0 of 2 would: its users go to a shared table the other process reads.
    services.user_table = OwnTable(table_path(fine_settings.data_dir, 0), 1024, 4096)
    try:
        assert services.model.version == base_version
        base_collections = services.collections
        apply_catalog(services, catalogue())
        from stream.kafka import Delivery
        from stream.users import apply_interactions

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
        # The load above passes on trending or catalogue fill as well: the users must have come
        # along, each with the vector the new model computes from the stored sequence ...
        rebuilt = assert_users_follow_the_served_model(services, base_collections.users)
        assert len(rebuilt) == 50
        # The shared user table holds every user again with the new version's vector, so the other
        # process answers them at once rather than passing them on until their next click.
        tables = PeerTables(fine_settings.data_dir)
        try:
            shared = {user_id: tables.read(0, user_id) for user_id in rebuilt}
        finally:
            tables.close()
        assert {u: s and (s.version, s.collection) for u, s in shared.items()} == \
            {u: (new_version, services.collections.users) for u in rebuilt}
        for user_id, hit in rebuilt.items():
            np.testing.assert_array_equal(shared[user_id].vector, hit.vectors["user"])  # type: ignore[union-attr]
        previous = stored_users(services, base_collections.users)  # kept until the next swap
        for user_id, hit in rebuilt.items():  # ... which is not the vector the base model computed
            assert not np.allclose(hit.vectors["user"], previous[user_id].vectors["user"], atol=1e-3), user_id
        # ... and a personal request is ranked with that vector.
        for user_id in ("u3", "u41"):
            assert_personal_answer_scored_with(services, user_id, rebuilt[user_id].vectors["user"],
                                               previous[user_id].vectors["user"])

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
        remove_tables(fine_settings.data_dir, 1)


def test_a_worker_down_during_a_promotion_rebuilds_items_and_users_when_it_starts(
    fine_settings: Settings, base_artefact: Path, models_dir: Path
) -> None:
    """The pointer still names the version the worker served when it stopped; the registry now
    promotes a fine-tuned one. ``reconcile`` at start-up rebuilds every item and user for it."""
    from stream.kafka import Delivery
    from stream.users import apply_interactions

    registry = registry_with(base_artefact, fine_settings.models_path, models_dir / "towers")
    base_version = registry.current_version()
    services = Services.open(fine_settings, CollectorRegistry())
    try:
        reconcile(services)  # a first start records the pointer
        assert read_pointer(fine_settings)["version"] == base_version  # type: ignore[index]
        base_collections = services.collections
        apply_catalog(services, catalogue())
        clicks = stream_clicks(seed=3)[: 50 * LENGTH]
        apply_interactions(services, [Delivery(c, "events.clicks", 0, n) for n, c in enumerate(clicks)])
    finally:
        services.close()

    InteractionLog(fine_settings.data_dir / "finetune", 10_000).append([
        {"e": c.event_id, "t": c.event_time, "u": c.user_id, "i": c.item_id, "a": 4} for c in stream_clicks()
    ])
    decision = run_cycle(fine_settings, drain=False, publish=False)
    assert decision.decision == "promoted", decision.reason
    new_version = decision.candidate_version

    services = Services.open(fine_settings, CollectorRegistry())
    try:
        assert services.model.version == new_version
        reconcile(services)
        assert services.collections == version_collections(fine_settings, new_version)
        pointer = read_pointer(fine_settings)
        assert pointer is not None
        assert (pointer["version"], pointer["users"]) == (new_version, services.collections.users)

        store = services.store
        before = store.retrieve(base_collections.items, [item.item_id for item in catalogue()], with_vectors=True)
        # The same text fields: each item's stored text vector is what the new version reads.
        items = assert_items_follow_the_served_model(
            services, {item_id: hit.vectors["text"] for item_id, hit in before.items()}
        )
        for item_id, hit in items.items():
            assert not np.allclose(hit.vectors["fused"], before[item_id].vectors["fused"], atol=1e-3), item_id
        users = assert_users_follow_the_served_model(services, base_collections.users)
        assert len(users) == 50
        previous = stored_users(services, base_collections.users)
        for user_id, hit in users.items():
            assert not np.allclose(hit.vectors["user"], previous[user_id].vectors["user"], atol=1e-3), user_id
        assert_personal_answer_scored_with(services, "u3", users["u3"].vectors["user"],
                                           previous["u3"].vectors["user"])
    finally:
        services.close()


def test_a_worker_that_served_the_rule_model_starts_on_a_trained_model_promoted_meanwhile(
    base_artefact: Path, models_dir: Path, tmp_path: Path
) -> None:
    """The first trained model is promoted while the worker, still on the rule model, is down:
    its vectors have other dimensions and other text (title, category and description)."""
    from stream.kafka import Delivery
    from stream.users import apply_interactions

    data_dir = tmp_path / "data"
    on_rules = load_settings(data_dir=data_dir, model_dir=models_dir)
    services = Services.open(on_rules, CollectorRegistry())
    try:
        assert services.model.version == RULE_VERSION
        reconcile(services)
        rule_collections = services.collections
        apply_catalog(services, catalogue())
        clicks = stream_clicks(seed=3)[: 20 * LENGTH]
        apply_interactions(services, [Delivery(c, "events.clicks", 0, n) for n, c in enumerate(clicks)])
    finally:
        services.close()

    registry = registry_with(base_artefact, tmp_path / "models", models_dir / "towers")
    trained = load_settings(data_dir=data_dir, model_dir=tmp_path / "models")
    services = Services.open(trained, CollectorRegistry())
    try:
        assert services.model.version == registry.current_version()
        reconcile(services)
        assert services.collections == version_collections(trained, services.model.version)
        assert read_pointer(trained)["version"] == services.model.version  # type: ignore[index]
        model = services.model
        titles = {item.item_id: compose_text(model.text_fields, item.model_dump()) for item in catalogue()}
        assert set(titles.values()) == {item.title for item in catalogue()}  # it reads titles only
        encoded = services.text_encoder.encode(list(titles.values()))  # type: ignore[attr-defined]
        assert_items_follow_the_served_model(services, dict(zip(titles, encoded)))
        users = assert_users_follow_the_served_model(services, rule_collections.users)
        assert len(users) == 20 and {len(hit.vectors["user"]) for hit in users.values()} == {model.fused_dim}
        response = recommend(services, RecRequest(request_id="after", user_id="u3", k=10), path="test")
        assert response.model_version == model.version and len(response.items) == 10
    finally:
        services.close()
