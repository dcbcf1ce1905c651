"""``UserState``: ordered, bounded sequences and idempotent application of deliveries."""
from __future__ import annotations

import json

from core.events import ClickEvent, SearchEvent
from model.serving.contract import ACTION_CODE
from stream.kafka import Delivery
from stream.users import UserState

T0 = 1_700_000_000.0
TOPIC = "events.clicks"


def click(event_id: str, item_id: str, at: float = T0, action: str = "click") -> ClickEvent:
    return ClickEvent(
        event_id=event_id, event_time=at, user_id="u1", item_id=item_id, action=action  # type: ignore[arg-type]
    )


def delivery(
    event: ClickEvent | SearchEvent, offset: int, partition: int = 0, topic: str = TOPIC
) -> Delivery:
    return Delivery(event, topic, partition, offset)


def apply(state: UserState, d: Delivery, *, max_length: int = 50, window: int = 256) -> None:
    assert isinstance(d.event, ClickEvent)
    state.append(d, d.event.item_id, ACTION_CODE[d.event.action], max_length, window)


def test_a_new_user_has_applied_nothing() -> None:
    state = UserState("u1")
    assert state.items == [] and state.actions == [] and state.applied == {}
    assert not state.already_applied(delivery(click("e0", "a"), offset=0))


def test_append_keeps_order_and_records_the_offset() -> None:
    state = UserState("u1")
    for offset, item in enumerate("abc"):
        apply(state, delivery(click(f"e{offset}", item, at=T0 + offset), offset=10 + offset))
    assert state.items == ["a", "b", "c"]
    assert state.actions == [ACTION_CODE["click"]] * 3
    assert state.applied == {f"{TOPIC}/0": 12}
    assert state.recent_ids == ["e0", "e1", "e2"]
    assert state.last_event_time == T0 + 2


def test_actions_travel_with_their_items() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e0", "a", action="view"), 0))
    apply(state, delivery(click("e1", "b", action="purchase"), 1))
    assert list(zip(state.items, state.actions)) == [
        ("a", ACTION_CODE["view"]),
        ("b", ACTION_CODE["purchase"]),
    ]


def test_append_bounds_the_sequence_to_the_most_recent() -> None:
    state = UserState("u1")
    for offset in range(12):
        apply(state, delivery(click(f"e{offset}", f"item-{offset}"), offset), max_length=5)
    assert state.items == [f"item-{n}" for n in range(7, 12)]
    assert len(state.actions) == 5


def test_recent_ids_are_bounded_by_the_window() -> None:
    state = UserState("u1")
    for offset in range(10):
        apply(state, delivery(click(f"e{offset}", "a"), offset), window=3)
    assert state.recent_ids == ["e7", "e8", "e9"]


def test_a_zero_window_keeps_no_event_ids() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e0", "a"), 0), window=0)
    assert state.recent_ids == []
    assert state.items == ["a"]


def test_offsets_are_kept_per_topic_and_partition() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e0", "a"), offset=40, partition=0))
    apply(state, delivery(click("e1", "b"), offset=7, partition=3))
    search = SearchEvent(event_id="s1", event_time=T0, user_id="u1", query="tent")
    state.append(delivery(search, offset=2, topic="events.searches"), "q:s1", ACTION_CODE["search"], 50, 256)
    assert state.applied == {f"{TOPIC}/0": 40, f"{TOPIC}/3": 7, "events.searches/0": 2}


def test_lower_or_equal_offsets_are_already_applied() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e5", "a"), offset=5))
    assert state.already_applied(delivery(click("other-1", "a"), offset=5))
    assert state.already_applied(delivery(click("other-2", "a"), offset=3))
    assert not state.already_applied(delivery(click("other-3", "a"), offset=6))


def test_offsets_of_other_partitions_and_topics_do_not_count() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e5", "a"), offset=100, partition=0))
    assert not state.already_applied(delivery(click("x1", "a"), offset=3, partition=1))
    search = SearchEvent(event_id="x2", event_time=T0, user_id="u1", query="tent")
    assert not state.already_applied(delivery(search, offset=3, topic="events.searches"))


def test_known_event_id_is_already_applied_at_a_new_offset() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e1", "a"), offset=5))
    # The producer sent the same event twice: new offset, same id.
    assert state.already_applied(delivery(click("e1", "a"), offset=9))


def test_event_time_only_moves_forward() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e0", "a", at=T0 + 10), 0))
    apply(state, delivery(click("e1", "b", at=T0), 1))  # a late event
    assert state.last_event_time == T0 + 10


def test_payload_round_trip_through_json() -> None:
    state = UserState("u1")
    apply(state, delivery(click("e0", "a", action="view"), 3, partition=1))
    apply(state, delivery(click("e1", "b", action="purchase", at=T0 + 5), 4, partition=1))
    payload = json.loads(json.dumps(state.payload()))  # as the store keeps it
    assert payload["updated_at"] > 0
    again = UserState.from_payload("u1", payload)
    assert again == state
    assert again.already_applied(delivery(click("e9", "c"), 4, partition=1))
    assert again.already_applied(delivery(click("e0", "c"), 99, partition=1))


def test_from_an_empty_payload() -> None:
    assert UserState.from_payload("u1", {}) == UserState("u1")
