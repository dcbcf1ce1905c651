"""The direct agents' poll loop (``run_consumer``): commit after handling, read again after a refusal."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from stream.agents.base import run_consumer

TP = TopicPartition("events.clicks", 0)


def batch(*offsets: int) -> dict[TopicPartition, list[SimpleNamespace]]:
    return {TP: [SimpleNamespace(offset=o) for o in offsets]}


class ScriptedConsumer:
    """Hands out the scripted polls in order (a batch, or an error to raise), then sets ``stop``."""

    def __init__(self, polls: list[object], stop: asyncio.Event) -> None:
        self.polls, self.stop_event = list(polls), stop
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.stopped = False

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[SimpleNamespace]]:
        if not self.polls:
            self.stop_event.set()
            return {}
        poll = self.polls.pop(0)
        if isinstance(poll, Exception):
            raise poll
        return poll  # type: ignore[return-value]

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


def test_an_unfinished_batch_is_read_again_and_committed_only_once_handled() -> None:
    stop, ready = asyncio.Event(), asyncio.Event()
    # A poll error, the batch (its dead letter refused), the batch read again, the next batch.
    consumer = ScriptedConsumer([KafkaError("poll"), batch(0, 1, 2), batch(0, 1, 2), batch(3, 4)], stop)
    handled: list[tuple[list[int], list[dict[TopicPartition, int]]]] = []

    async def handle(records: list[SimpleNamespace]) -> None:
        handled.append(([r.offset for r in records], list(consumer.commits)))
        if len(handled) == 1:
            raise KafkaError("dead letter not acknowledged")

    asyncio.run(run_consumer(consumer, handle, stop, name="click", ready=ready,  # type: ignore[arg-type]
                             reread_unfinished=True))

    assert [offsets for offsets, _ in handled] == [[0, 1, 2], [0, 1, 2], [3, 4]]
    assert consumer.seeks == [(TP, 0)]
    assert handled[1][1] == []  # nothing committed for the refused batch
    assert consumer.commits[-1] == {TP: 5}
    assert ready.is_set() and consumer.stopped


def test_without_rereading_a_refused_batch_ends_the_loop_uncommitted() -> None:
    stop = asyncio.Event()
    consumer = ScriptedConsumer([batch(0, 1)], stop)

    async def handle(records: list[SimpleNamespace]) -> None:
        raise KafkaError("response not acknowledged")

    with pytest.raises(KafkaError):
        asyncio.run(run_consumer(consumer, handle, stop, name="request"))  # type: ignore[arg-type]
    assert consumer.commits == [] and consumer.seeks == [] and consumer.stopped
