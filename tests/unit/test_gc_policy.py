"""The garbage-collector policy: frozen objects are not walked, a full collection still frees their cycles."""
from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from exporter.metrics import Metrics
from stream.gc_policy import freeze_survivors, full_collection, run_policy


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def _cycle() -> tuple[Node, weakref.ref[Node]]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


def _walked(obj: object) -> bool:
    """Whether a full collection walks ``obj`` (it sits in generation 2, not in the frozen set)."""
    return any(o is obj for o in gc.get_objects(generation=2))


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.collect()


def test_frozen_objects_are_not_walked_and_a_full_collection_frees_their_cycles() -> None:
    node, alive = _cycle()
    gc.collect()
    assert _walked(node)
    freeze_survivors()
    assert not _walked(node)
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()  # what the interpreter does on its own: frozen objects are skipped
    assert alive() is not None, "a frozen cycle outlives its last reference until a full collection"
    full_collection()
    assert alive() is None
    assert gc.get_freeze_count() > 0, "the survivors are frozen again"


def test_the_policy_freezes_what_survives_and_frees_frozen_cycles_at_its_full_collection() -> None:
    metrics = Metrics(CollectorRegistry())
    callbacks = list(gc.callbacks)

    async def scenario() -> weakref.ref[Node]:
        stop = asyncio.Event()
        policy = asyncio.create_task(run_policy(metrics, stop, freeze_s=0.05, full_s=0.3))
        await asyncio.sleep(0)  # the policy's first freeze
        node, alive = _cycle()
        await asyncio.sleep(0.12)  # at least one periodic freeze since the node was made
        assert not _walked(node)
        del node
        await asyncio.sleep(0.4)  # past the full collection
        stop.set()
        await policy
        return alive

    alive = asyncio.run(scenario())
    assert alive() is None, "the full collection freed the frozen cycle"
    assert (metrics.registry.get_sample_value("streamrec_gc_frozen_objects") or 0) > 0
    assert (metrics.registry.get_sample_value("streamrec_gc_pause_seconds_count", {"generation": "2"}) or 0) >= 3
    assert gc.callbacks == callbacks, "the pause observer is removed when the policy stops"


def test_freeze_0_leaves_the_interpreter_alone_but_still_observes_pauses() -> None:
    metrics = Metrics(CollectorRegistry())

    async def scenario() -> None:
        stop = asyncio.Event()
        policy = asyncio.create_task(run_policy(metrics, stop, freeze_s=0.0, full_s=0.0))
        await asyncio.sleep(0.01)
        gc.collect(0)
        stop.set()
        await policy

    asyncio.run(scenario())
    assert gc.get_freeze_count() == 0
    assert (metrics.registry.get_sample_value("streamrec_gc_pause_seconds_count", {"generation": "0"}) or 0) >= 1
    assert metrics.registry.get_sample_value("streamrec_gc_frozen_objects") == 0
