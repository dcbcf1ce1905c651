"""Clicks keep being applied while a worker builds a new version's vectors, and none is lost.

The worker's services serve the base version; a fine-tuned version is promoted.
While ``hot_swap`` builds the new collections, a click agent applies batches
exactly as the worker's does (under the write lock). The build is held open
until several batches have been applied during it: with ingestion paused for
the build, none could be. After the switch, every user, including those who
clicked during the build, is in the new collections with the sequence holding
those clicks and the vector the new version computes from it.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench.finetune import swap_while_clicking
from core.settings import Settings
from finetune.job import InteractionLog, run_cycle
from stream import swap
from stream.catalog import apply_catalog
from stream.kafka import Delivery
from stream.services import Services
from stream.users import UserState, apply_interactions
from tests.integration.synthetic import LENGTH, registry_with
from tests.integration.test_finetune import (  # noqa: F401 (fixture)
    assert_users_follow_the_served_model,
    catalogue,
    fine_settings,
    stream_clicks,
)

BATCHES_DURING_BUILD = 3


def test_clicks_are_applied_while_a_new_version_is_built_and_caught_up_before_the_switch(
    fine_settings: Settings, base_artefact: Path, models_dir: Path, monkeypatch  # noqa: F811
) -> None:
    registry = registry_with(base_artefact, fine_settings.models_path, models_dir / "towers")
    base_version = registry.current_version()
    services = Services.open(fine_settings, CollectorRegistry())
    try:
        apply_catalog(services, catalogue())
        clicks = stream_clicks(seed=3)[: 50 * LENGTH]
        apply_interactions(services, [Delivery(c, "events.clicks", 0, n) for n, c in enumerate(clicks)])
        InteractionLog(fine_settings.data_dir / "finetune", 10_000).append([
            {"e": c.event_id, "t": c.event_time, "u": c.user_id, "i": c.item_id, "a": 4} for c in stream_clicks()
        ])
        decision = run_cycle(fine_settings, drain=False, publish=False)
        assert decision.decision == "promoted", decision.reason
        old_users = services.collections.users

        # The build waits (at most 60 s) until the click agent has applied batches during it.
        build_state, building = swap.build_state, threading.Event()
        during: list[int] = []

        def held_open_build(*args, **kwargs):  # type: ignore[no-untyped-def]
            building.set()
            state = build_state(*args, **kwargs)
            for _ in range(600):
                if len(during) >= BATCHES_DURING_BUILD:
                    break
                threading.Event().wait(0.1)
            return state

        monkeypatch.setattr(swap, "build_state", held_open_build)
        stored_before = {uid: len(UserState.from_payload(uid, hit.payload).items)
                         for uid, hit in services.store.retrieve(old_users, [f"u{u}" for u in range(50)]).items()}

        swapped, applied = asyncio.run(_run_and_count(services, building, during, base_version, monkeypatch))
        assert swapped and services.model.version == decision.candidate_version
        assert len(during) >= BATCHES_DURING_BUILD, f"{len(during)} click batches applied during the build"
        # Nothing applied during the build was lost: the new collections hold every click.
        rebuilt = assert_users_follow_the_served_model(services, old_users)
        grown = {uid: len(UserState.from_payload(uid, hit.payload).items) for uid, hit in rebuilt.items()}
        assert sum(grown.values()) > sum(stored_before.values())
        assert len(applied) >= BATCHES_DURING_BUILD
    finally:
        services.close()


async def _run_and_count(services: Services, building: threading.Event, during: list[int],
                         base_version: str, monkeypatch) -> tuple[bool, list[float]]:  # type: ignore[no-untyped-def]
    """``swap_while_clicking``, noting in ``during`` each batch applied after the build began
    and while the base version still served."""
    from stream import users as users_module

    apply = users_module.apply_interactions

    def counted(services_: Services, deliveries: list) -> int:  # type: ignore[type-arg]
        applied = apply(services_, deliveries)
        if building.is_set() and services_.model.version == base_version:
            during.append(len(deliveries))
        return applied

    monkeypatch.setattr(users_module, "apply_interactions", counted)  # what swap_while_clicking calls
    return await swap_while_clicking(services, users=50, seed=7, batch=10)
