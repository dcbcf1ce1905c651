"""Catalogue, interactions and recommendations in one process, without a broker.

Real components throughout: the exported towers and rule scorer, a qdrant-edge
store in a temporary folder, and the same ``apply_catalog``,
``apply_interactions`` and ``recommend`` the agents call.
"""
from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from core.events import (
    CatalogItem,
    ImageRef,
    RecResponse,
    RequestFilters,
)
from exporter.drift import DriftMonitor, DriftResults, dimension_psi, gini, psi
from stream.catalog import apply_catalog
from stream.store import SearchFilter
from stream.users import apply_interactions
from tests.unit.world import (
    CATALOGUE,
    CATEGORY,
    PRICE,
    T0,
    World,
    ids,
    photo_b64,
)

# --- catalogue -----------------------------------------------------------------


def test_catalogue_items_become_retrievable_vectors(world: World) -> None:
    world.catalogue()
    assert world.item_ids() == set(CATEGORY)
    hits = world.services.store.retrieve(world.services.collections.items, ["tent-1"], with_vectors=True)
    tent = hits["tent-1"]
    assert tent.payload["category"] == "tents" and tent.payload["price"] == 240.0
    assert set(tent.vectors) == {"fused", "text"}  # no photo given
    assert np.linalg.norm(tent.vectors["fused"]) == pytest.approx(1.0, abs=1e-4)


def test_an_undecodable_image_is_rejected_while_the_others_apply(world: World) -> None:
    (world.services.settings.image_root / "boot.png").write_bytes(  # type: ignore[operator]
        base64.b64decode(photo_b64((90, 60, 30)))
    )
    items = [
        CatalogItem(event_id="c0", event_time=T0, item_id="good-photo", title="Red tent",
                    category="tents", price=99.0, image=ImageRef(image_b64=photo_b64((200, 30, 30)))),
        CatalogItem(event_id="c1", event_time=T0, item_id="broken-photo", title="Blue tent",
                    category="tents", price=99.0,
                    image=ImageRef(image_b64=base64.b64encode(b"definitely not an image").decode())),
        CatalogItem(event_id="c2", event_time=T0, item_id="no-photo", title="Green tent",
                    category="tents", price=99.0),
        CatalogItem(event_id="c3", event_time=T0, item_id="escaping-photo", title="Grey tent",
                    category="tents", price=99.0, image=ImageRef(image_uri="../state/secret.png")),
        CatalogItem(event_id="c4", event_time=T0, item_id="file-photo", title="Brown boots",
                    category="shoes", price=150.0, image=ImageRef(image_uri="boot.png")),
    ]
    rejected = apply_catalog(world.services, items)
    assert sorted((r.index, r.error.reason) for r in rejected) == [
        (1, "bad_image"),
        (3, "image_uri_forbidden"),
    ]
    assert world.item_ids() == {"good-photo", "no-photo", "file-photo"}
    hits = world.services.store.retrieve(
        world.services.collections.items, ["good-photo", "no-photo", "file-photo"], with_vectors=True
    )
    assert set(hits["good-photo"].vectors) == {"fused", "text", "image"}
    assert hits["good-photo"].payload["has_image"] is True
    assert "image" not in hits["no-photo"].vectors
    assert hits["no-photo"].payload["has_image"] is False
    assert hits["file-photo"].payload["image_uri"] == "boot.png"


def test_an_upsert_without_a_photo_keeps_the_existing_photo(world: World) -> None:
    first = CatalogItem(event_id="c0", event_time=T0, item_id="tent", title="Red tent",
                        image=ImageRef(image_b64=photo_b64((200, 30, 30))))
    assert apply_catalog(world.services, [first]) == []
    renamed = CatalogItem(event_id="c1", event_time=T0 + 1, item_id="tent", title="Crimson tent")
    assert apply_catalog(world.services, [renamed]) == []
    hit = world.services.store.retrieve(world.services.collections.items, ["tent"], with_vectors=True)["tent"]
    assert "image" in hit.vectors
    assert hit.payload["title"] == "Crimson tent" and hit.payload["has_image"] is True


def test_deleted_items_leave_the_results(world: World) -> None:
    world.catalogue()
    assert apply_interactions(world.services, [world.click("fan", "tent-2", "purchase"),
                                               world.click("fan", "tent-1")]) == 2
    # Asked for few of the 12 items, so that finding them means something.
    assert "tent-3" in ids(world.recommend("fan", k=2))  # like what the fan bought
    assert ids(world.recommend("stranger", k=2)) == ["tent-2", "tent-1"]  # trending: a purchase, a click

    gone = [CatalogItem(event_id=world.event_id(), event_time=T0 + 5, item_id=i, op="delete")
            for i in ("tent-1", "tent-3")]
    assert apply_catalog(world.services, gone) == []
    assert world.item_ids() == set(CATEGORY) - {"tent-1", "tent-3"}
    for user_id in ("fan", "stranger", "newcomer"):
        served = ids(world.recommend(user_id))
        assert served, user_id
        assert not {"tent-1", "tent-3"} & set(served), user_id


def test_the_last_event_for_an_item_in_a_batch_wins(world: World) -> None:
    batch = [
        CatalogItem(event_id="c0", event_time=T0, item_id="a", title="Tent"),
        CatalogItem(event_id="c1", event_time=T0, item_id="b", title="Boots"),
        CatalogItem(event_id="c2", event_time=T0, item_id="a", op="delete"),
        CatalogItem(event_id="c3", event_time=T0, item_id="b", title="Better boots"),
    ]
    assert apply_catalog(world.services, batch) == []
    assert world.item_ids() == {"b"}
    hits = world.services.store.retrieve(world.services.collections.items, ["b"])
    assert hits["b"].payload["title"] == "Better boots"


def test_the_model_reads_an_items_attributes_with_its_category(world: World, monkeypatch) -> None:
    """A trained model places an item it does not know by these names (``attribute_names``), so every
    path that embeds an item hands them over: a catalogue upsert and a later photo of it."""
    from core.events import ImageEvent
    from stream.catalog import apply_catalog_photos

    seen: list[list[str]] = []
    model = world.services.model
    original = model.item_vectors

    def recording(content):  # type: ignore[no-untyped-def]
        seen.append(list(content.categories))
        return original(content)

    monkeypatch.setattr(model, "item_vectors", recording)
    apply_catalog(world.services, [CatalogItem(event_id="c0", event_time=T0, item_id="film", title="A film",
                                               category="Drama|War", attributes={"year": "1995"})])
    photo = ImageRef(image_b64=photo_b64((10, 200, 10)))
    apply_catalog_photos(world.services, [ImageEvent(event_id="p0", event_time=T0, purpose="catalog_photo",
                                                     item_id="film", image=photo)])
    assert seen == [["Drama|War|year=1995"], ["Drama|War|year=1995"]]


# --- interactions ------------------------------------------------------------------


def test_a_click_on_an_unknown_item_does_not_crash_and_the_user_is_served(world: World) -> None:
    world.catalogue()
    assert apply_interactions(world.services, [world.click("early", "not-yet-listed")]) == 1
    stored = world.stored_user("early")
    assert stored["payload"]["items"] == ["not-yet-listed"]  # type: ignore[index]
    assert "user" not in stored["vectors"]  # type: ignore[operator]  # nothing to embed yet: cold
    served = ids(world.recommend("early"))
    assert served and "not-yet-listed" not in served
    assert set(served) <= set(CATEGORY)


def test_the_unknown_item_counts_once_it_is_listed(world: World) -> None:
    world.catalogue([row for row in CATALOGUE if row[0] != "book-1"])
    apply_interactions(world.services, [world.click("early", "book-1", "purchase")])
    world.catalogue([row for row in CATALOGUE if row[0] == "book-1"])
    apply_interactions(world.services, [world.click("early", "book-2")])
    stored = world.stored_user("early")
    assert stored["payload"]["items"] == ["book-1", "book-2"]  # type: ignore[index]
    assert "user" in stored["vectors"]  # type: ignore[operator]


def test_duplicate_deliveries_are_skipped(world: World) -> None:
    world.catalogue()
    batch = [world.click("u1", "tent-1"), world.click("u1", "shoe-2")]
    assert apply_interactions(world.services, batch) == 2
    before = world.stored_user("u1")
    # The same records again, as after a consumer restart before its commit.
    assert apply_interactions(world.services, batch) == 0
    # The same event produced twice lands at a new offset.
    resent = world.delivery(batch[1].event)
    assert resent.offset > batch[1].offset
    assert apply_interactions(world.services, [resent]) == 0
    after = world.stored_user("u1")
    assert after["payload"]["items"] == ["tent-1", "shoe-2"]  # type: ignore[index]
    np.testing.assert_allclose(after["vectors"]["user"], before["vectors"]["user"])  # type: ignore[index]
    assert world.registry.get_sample_value("streamrec_events_duplicate_total", {"topic": "clicks"}) == 3


def test_a_duplicate_inside_one_batch_is_applied_once(world: World) -> None:
    world.catalogue()
    first = world.click("u1", "tent-1")
    assert apply_interactions(world.services, [first, first, world.delivery(first.event)]) == 1
    assert world.stored_user("u1")["payload"]["items"] == ["tent-1"]  # type: ignore[index]


def test_a_search_joins_the_sequence_and_steers_recommendations(world: World) -> None:
    world.catalogue()
    assert apply_interactions(world.services, [world.search("camper", "camping tent")]) == 1
    items = world.stored_user("camper")["payload"]["items"]  # type: ignore[index]
    assert len(items) == 1 and items[0].startswith("q:")  # type: ignore[union-attr]
    served = ids(world.recommend("camper", k=3))
    assert served and all(CATEGORY[item_id] == "tents" for item_id in served), served


# --- recommendations ---------------------------------------------------------------


def test_recommendations_never_include_seen_items(world: World) -> None:
    world.catalogue()
    seen = ["tent-1", "tent-2", "shoe-2"]
    apply_interactions(world.services, [world.click("u1", item_id) for item_id in seen])
    apply_interactions(world.services, [world.click("other", "tent-3", "purchase")])
    for request in ({}, {"query": "tent"}, {"filters": RequestFilters(categories=["tents"])}):
        served = ids(world.recommend("u1", **request))
        assert served, request
        assert not set(seen) & set(served), request
    assert "tent-3" in ids(world.recommend("u1", k=3))  # a tent others bought, among three of nine


def test_exclude_ids_are_honoured(world: World) -> None:
    world.catalogue()
    apply_interactions(world.services, [world.click("u1", "book-1")])
    served = ids(world.recommend("u1", filters=RequestFilters(exclude_ids=["book-2", "book-3"])))
    assert served and not {"book-1", "book-2", "book-3"} & set(served)


def test_seen_means_the_kept_sequence_and_older_items_can_come_back(open_world: Callable[..., World]) -> None:
    """A user's state keeps the last ``user_sequence_length`` interactions, searches included
    (README, Configuration): those are never served; items older than that may be again."""
    world = open_world(user_sequence_length=4)
    world.catalogue()
    walked = ["tent-1", "tent-2", "tent-3", "tent-4", "shoe-1", "shoe-2"]  # oldest first
    assert apply_interactions(world.services, [world.click("hiker", item_id) for item_id in walked]) == 6
    kept, forgotten = walked[-4:], walked[:2]
    assert world.stored_user("hiker")["payload"]["items"] == kept  # type: ignore[index]
    servable = set(CATEGORY) - set(kept)
    # Exactly as many as may be served, so the personal retrieval alone answers (no catalogue
    # fill): any kept item in the answer would push one of these out.
    assert set(ids(world.recommend("hiker", k=len(servable)))) == servable
    # Only the two forgotten tents are left among the tents, on the personal and the search path;
    # asking for one more shows nothing else gets in.
    tents = RequestFilters(categories=["tents"])
    assert sorted(ids(world.recommend("hiker", k=3, filters=tents))) == forgotten
    assert sorted(ids(world.recommend("hiker", k=3, query="tent", filters=tents))) == forgotten
    # A search takes a place in the sequence as well: tent-3 drops out of it and may come back.
    assert apply_interactions(world.services, [world.search("hiker", "trail running")]) == 1
    assert world.stored_user("hiker")["payload"]["items"][:3] == kept[1:]  # type: ignore[index]
    assert set(ids(world.recommend("hiker", k=len(servable) + 1))) == servable | {"tent-3"}


def test_a_visual_search_holds_the_filters_and_leaves_out_seen_items(world: World) -> None:
    query_colour = (200, 40, 40)
    # (item id, category, photo colour): three items wear the query's very photo.
    photographed = [
        ("tent-seen", "tents", query_colour),
        ("tent-twin", "tents", query_colour),
        ("shoe-excluded", "shoes", query_colour),
        ("shoe-red", "shoes", (180, 60, 50)),
        ("shoe-green", "shoes", (40, 160, 60)),
        ("shoe-blue", "shoes", (30, 50, 200)),
        ("tent-green", "tents", (40, 160, 60)),
        ("tent-blue", "tents", (30, 50, 200)),
    ]
    assert apply_catalog(world.services, [
        CatalogItem(event_id=world.event_id(), event_time=T0, item_id=item_id, title=f"Item {item_id}",
                    category=category, price=50.0, image=ImageRef(image_b64=photo_b64(colour)))
        for item_id, category, colour in photographed
    ]) == []
    # The shopper bought the first tent; the other twins are what everyone else buys (trending).
    crowd = [world.click(f"fan-{n}", item_id, "purchase")
             for n in range(3) for item_id in ("tent-twin", "shoe-excluded")]
    assert apply_interactions(world.services, [world.click("shopper", "tent-seen", "purchase"), *crowd]) == 7
    query = photo_b64(query_colour)
    # Without filters or history the three twins are the answer: what a broken filter would let in.
    assert set(ids(world.visual_search("stranger", query, k=3))) == {"tent-seen", "tent-twin", "shoe-excluded"}
    # Three shoes are left for the shopper, who leans to tents; two are asked for.
    served = world.visual_search("shopper", query, k=2,
                                 filters=RequestFilters(categories=["shoes"], exclude_ids=["shoe-excluded"]))
    assert len(served) == 2 and set(ids(served)) <= {"shoe-red", "shoe-green", "shoe-blue"}, served
    assert all(reason == "looks like your photo" for _, reason in served), served
    # Without filters the seen twin is still left out (two of the seven others are asked for).
    unfiltered = ids(world.visual_search("shopper", query, k=2))
    assert len(unfiltered) == 2 and "tent-seen" not in unfiltered, unfiltered


@pytest.mark.parametrize("user_id", ["reader", "nobody"])  # personal and cold
def test_category_and_price_filters_hold(world: World, user_id: str) -> None:
    world.catalogue()
    apply_interactions(world.services, [world.click("reader", "book-1"), world.click("reader", "tent-4"),
                                        world.click("shopper", "tent-2"), world.click("shopper", "shoe-1")])
    books = ids(world.recommend(user_id, filters=RequestFilters(categories=["books"])))
    assert books and all(CATEGORY[i] == "books" for i in books), books
    cheap = ids(world.recommend(user_id, filters=RequestFilters(max_price=50.0)))
    assert cheap and all(PRICE[i] <= 50.0 for i in cheap), cheap
    outdoor = RequestFilters(categories=["tents", "shoes"], max_price=100.0)
    both = ids(world.recommend(user_id, filters=outdoor))
    assert both and all(CATEGORY[i] in ("tents", "shoes") and PRICE[i] <= 100.0 for i in both), both
    assert ids(world.recommend(user_id, filters=RequestFilters(categories=["garden"]))) == []


def test_k_limits_the_answer(world: World) -> None:
    world.catalogue()
    apply_interactions(world.services, [world.click("u1", "shoe-1")])
    assert len(world.recommend("u1", k=3)) == 3
    assert len(set(ids(world.recommend("u1", k=100)))) == len(CATALOGUE) - 1


def test_a_cold_user_with_no_signal_gets_catalogue_items(world: World) -> None:
    world.catalogue()
    served = world.recommend("first-visitor", k=5)
    assert len(served) == 5
    assert set(ids(served)) <= set(CATEGORY)
    assert all("catalogue" in reason for _, reason in served)


def test_an_empty_catalogue_answers_with_no_items(world: World) -> None:
    assert world.recommend("first-visitor") == []


def test_trending_items_reach_cold_users_once_there_are_clicks(world: World) -> None:
    world.catalogue()
    crowd = [world.click(f"fan-{n}", "shoe-3", "purchase") for n in range(5)]
    crowd += [world.click("fan-0", "book-4")]
    assert apply_interactions(world.services, crowd) == 6
    served = world.recommend("newcomer", k=5)
    assert ids(served)[0] == "shoe-3"
    assert dict(served)["shoe-3"] == "trending now"
    assert "book-4" in ids(served)


def test_a_personal_user_is_served_close_to_what_they_did(world: World) -> None:
    world.catalogue()
    apply_interactions(world.services, [world.click("hiker", "shoe-2", "view"),
                                        world.click("hiker", "tent-1", "purchase"),
                                        world.click("hiker", "tent-3", "add_to_cart")])
    served = world.recommend("hiker", k=2)
    assert all(CATEGORY[item_id] == "tents" for item_id, _ in served), served
    assert all(reason.startswith("because you viewed") for _, reason in served), served


def test_what_others_chose_next_is_suggested_after_the_same_item(world: World) -> None:
    world.catalogue()
    apply_interactions(world.services, [world.click("camper", "tent-1", "purchase")])
    # Content alone puts tents next to a tent, not a bird guide.
    assert ids(world.recommend("camper", k=3))[0] != "book-3"
    # Shoppers who bought the tent bought the bird guide next.
    walks = [d for n in range(4) for d in (world.click(f"birder-{n}", "tent-1", "purchase"),
                                           world.click(f"birder-{n}", "book-3", "purchase"))]
    assert apply_interactions(world.services, walks) == 8
    served = world.recommend("camper", k=3)
    assert ids(served)[0] == "book-3", served
    assert dict(served)["book-3"] == "often chosen after 'Two-person backpacking tent'"
    # Filters hold for co-visit candidates as for any other.
    shoes = ids(world.recommend("camper", filters=RequestFilters(categories=["shoes"])))
    assert shoes and "book-3" not in shoes
    # Once the camper has the guide it is not suggested again.
    apply_interactions(world.services, [world.click("camper", "book-3", "purchase")])
    assert "book-3" not in ids(world.recommend("camper"))


def test_a_cold_user_with_a_filter_gets_matching_items_whatever_is_trending(world: World) -> None:
    world.catalogue()
    apply_interactions(world.services, [world.click("runner", "shoe-1"), world.click("runner", "shoe-2")])
    books = ids(world.recommend("newcomer", filters=RequestFilters(categories=["books"])))
    assert books and all(CATEGORY[i] == "books" for i in books), books


def test_an_item_without_a_price_never_passes_a_price_cap(world: World) -> None:
    world.catalogue()
    unpriced = CatalogItem(event_id=world.event_id(), event_time=T0, item_id="tent-5",
                           title="Tent of unknown price", category="tents")
    assert apply_catalog(world.services, [unpriced]) == []
    cheap = RequestFilters(max_price=50.0)
    # What the store's filter means by max_price: an unpriced item does not pass.
    store, items = world.services.store, world.services.collections.items
    tent_5 = store.retrieve(items, ["tent-5"], with_vectors=["fused"])["tent-5"]
    found = store.search(items, "fused", tent_5.vectors["fused"], 20, SearchFilter(max_price=50.0))
    assert found and "tent-5" not in [hit.id for hit in found]
    # recommend must mean the same, whichever way a candidate was found.
    apply_interactions(world.services, [world.click("fan", "tent-5", "purchase")])
    served = ids(world.recommend("newcomer", filters=cheap))
    assert served and "tent-5" not in served, served


# --- swapping collections ---------------------------------------------------------


def test_a_swap_keeps_the_replaced_collections_for_one_more_swap(world: World) -> None:
    from core.errors import ConfigError
    from stream.swap import install
    from stream.versions import (
        ServingState,
        collection_specs,
        new_item_cache,
        read_pointer,
        version_collections,
    )

    services = world.services
    world.catalogue()

    def state_for(version: str) -> ServingState:
        collections = version_collections(services.settings, version)
        for spec in collection_specs(collections, services.model):
            services.store.ensure_collection(spec)
        return ServingState(services.model, collections, new_item_cache(services.settings, services.model))

    first = services.collections
    second, third = state_for("v2"), state_for("v3")
    install(services, second)
    assert services.store.count(first.items) == len(CATALOGUE)  # kept: requests in flight, rollback
    assert read_pointer(services.settings)["retired"]["items"] == first.items  # type: ignore[index]
    install(services, third)
    for name in (first.items, first.users, first.queries):
        with pytest.raises(ConfigError):
            services.store.count(name)
    assert services.store.count(second.collections.items) == 0  # the previous one is kept
    assert not (services.settings.store_path / first.items).exists()
    assert services.collections == third.collections


def test_a_version_with_its_own_transitions_replaces_what_the_stream_taught(world: World) -> None:
    import copy

    from model.serving.covisit import build_table
    from stream.swap import install
    from stream.versions import (
        ServingState,
        collection_specs,
        new_item_cache,
        version_collections,
    )

    services = world.services
    world.catalogue()
    apply_interactions(services, [world.click("a", "tent-1"), world.click("a", "book-3")])
    assert services.covisit.row("tent-1") == {"book-3": 1.0}

    def state_for(version: str, model: object) -> ServingState:
        collections = version_collections(services.settings, version)
        for spec in collection_specs(collections, services.model):
            services.store.ensure_collection(spec)
        return ServingState(model, collections, new_item_cache(services.settings, services.model))  # type: ignore[arg-type]

    install(services, state_for("v2", services.model))  # no table of its own: the stream's stays
    assert services.covisit.row("tent-1") == {"book-3": 1.0}
    # A fine-tuned version's table already holds those clicks: they are not counted twice.
    tuned = copy.copy(services.model)
    tuned.transitions = build_table([], n_items=1)  # type: ignore[misc]
    install(services, state_for("v3", tuned))
    assert len(services.covisit) == 0


def test_a_version_reading_other_text_fields_gets_its_item_text_re_embedded(world: World) -> None:
    """Rule model (title, category, description) -> a version trained on titles: each item's
    text vector is rebuilt from the payload's fields, so it is what that version learned."""
    import copy

    from stream.swap import build_state

    services = world.services
    world.catalogue()
    titles_only = copy.copy(services.model)
    titles_only.text_fields = ("title",)  # type: ignore[misc]
    titles_only.version = "titles-only"  # type: ignore[misc]
    state = build_state(services, titles_only)
    ids = [item_id for item_id, *_ in CATALOGUE]
    rebuilt = services.store.retrieve(state.collections.items, ids, with_vectors=["text"])
    before = services.store.retrieve(services.collections.items, ids, with_vectors=["text"])
    encoder = services.text_encoder
    titles = encoder.encode([title for _, title, _, _ in CATALOGUE])  # type: ignore[union-attr]
    full = encoder.encode([f"{title}. {category}" for _, title, category, _ in CATALOGUE])  # type: ignore[union-attr]
    for n, item_id in enumerate(ids):  # text vectors are stored in float16: three digits
        np.testing.assert_allclose(rebuilt[item_id].vectors["text"], titles[n], atol=1e-3)
        np.testing.assert_allclose(before[item_id].vectors["text"], full[n], atol=1e-3)
        assert float(titles[n] @ full[n]) < 0.99  # the two texts really are different vectors
    # Rebuilding from those title-only vectors for a version that reads every field (as a
    # worker does at start-up, told by the pointer what the stored vectors were made of).
    back = copy.copy(services.model)
    back.version = "all-fields-again"  # type: ignore[misc]
    again = build_state(services, back, state.collections, source_text_fields=("title",))
    restored = services.store.retrieve(again.collections.items, ids, with_vectors=["text"])
    for n, item_id in enumerate(ids):
        np.testing.assert_allclose(restored[item_id].vectors["text"], full[n], atol=1e-3)
    # The same fields: the stored vectors are reused as they are.
    same = copy.copy(services.model)
    same.version = "same-fields"  # type: ignore[misc]
    kept = services.store.retrieve(build_state(services, same).collections.items, ids, with_vectors=["text"])
    for item_id in ids:
        np.testing.assert_array_equal(kept[item_id].vectors["text"], before[item_id].vectors["text"])


def test_the_pointer_records_what_item_text_was_made_of(world: World) -> None:
    from stream.versions import read_pointer, write_pointer

    services = world.services
    write_pointer(services.settings, services.model, services.collections)
    assert read_pointer(services.settings)["text_fields"] == ["title", "category", "description"]  # type: ignore[index]


# --- drift -----------------------------------------------------------------------------


class RecordingDrift(DriftMonitor):
    """The worker's drift monitor, keeping what every ``update`` was given as well."""

    def __init__(self, monitor: DriftMonitor) -> None:
        super().__init__(monitor.reference_size, monitor.window_size, monitor.thresholds)
        self.updates: list[dict[str, Any]] = []

    def update(self, scores: np.ndarray | None = None, user_vector: np.ndarray | None = None,
               served: list[str] | None = None, clicks: int = 0, impressions: int = 0) -> None:
        self.updates.append({
            "scores": None if scores is None else np.array(scores),
            "user_vector": None if user_vector is None else np.array(user_vector),
            "served": None if served is None else list(served),
            "clicks": clicks, "impressions": impressions,
        })
        super().update(scores, user_vector, served, clicks, impressions)


def alert_threshold(gauge: str) -> float:
    """The value the alert rule on ``gauge`` fires beyond (``infra/prometheus/alerts.yml``)."""
    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "infra/prometheus/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"] if gauge in rule["expr"]]
    assert len(exprs) == 1, exprs
    match = re.fullmatch(rf"\s*{gauge}\s*[<>]\s*([0-9.]+)\s*", exprs[0])
    assert match, exprs[0]
    return float(match.group(1))


def drift_gauge(world: World, name: str) -> float | None:
    """Publishes the monitor's results as the worker's drift timer does, and reads one gauge back."""
    world.services.metrics.set_drift(world.services.drift.results())
    return world.registry.get_sample_value(f"streamrec_drift_{name}")


def test_requests_and_clicks_on_served_lists_feed_the_drift_monitor(open_world: Callable[..., World]) -> None:
    world = open_world(drift_reference_size=10, drift_window_size=10)
    assert (world.services.drift.reference_size, world.services.drift.window_size) == (10, 10)
    drift = RecordingDrift(world.services.drift)
    world.services.drift = drift
    world.catalogue()
    assert apply_interactions(world.services, [world.click("fan", "tent-1"), world.click("fan", "book-1")]) == 2
    assert drift.updates == []  # clicks that were not on a served list

    def fed(response: RecResponse) -> None:
        """The last update is the served list: its ids, scores in served order, one impression each."""
        update = drift.updates[-1]
        assert update["served"] == [item.item_id for item in response.items]
        np.testing.assert_allclose(update["scores"], [item.score for item in response.items], atol=1e-6)  # rounded
        assert (update["impressions"], update["clicks"]) == (len(response.items), 0)
        users = world.services.collections.users
        stored = world.services.store.retrieve(users, [response.user_id], with_vectors=True)
        if response.user_id in stored:
            np.testing.assert_array_equal(update["user_vector"], stored[response.user_id].vectors["user"])
        else:
            assert update["user_vector"] is None  # a cold user has no vector to compare

    personal = world.respond("fan", k=4)
    fed(personal)
    assert drift.updates[-1]["user_vector"] is not None
    fed(world.respond("stranger", k=3))
    assert len(drift.updates) == 2

    # Clicks with a position were on a served list: they count, views and position-less clicks do not.
    drift.updates.clear()
    served = [item.item_id for item in personal.items]
    assert apply_interactions(world.services, [
        world.click("fan", served[0], position=0),
        world.click("fan", served[1], "add_to_cart", position=1),
        world.click("fan", served[2], "view", position=2),
        world.click("fan", "book-4"),
    ]) == 4
    assert [(u["clicks"], u["impressions"], u["served"]) for u in drift.updates] == [(2, 0, None)]
    assert not drift.results().reference_ready  # 7 of 10 reference scores so far
    fed(world.respond("fan", k=3))
    assert drift.results().reference_ready  # reference: 2 clicks in 10 impressions
    fed(world.respond("fan", k=5))
    assert apply_interactions(world.services, [world.click("fan", served[3], position=3),
                                               world.click("walker", "shoe-1", "view", position=0)]) == 2
    # Current window: 1 click in 5 impressions; (1/5) / (2/10) = 1.
    assert drift.results().ctr_ratio == pytest.approx(1.0)
    assert apply_interactions(world.services, [world.click("runner", "shoe-2", "purchase", position=4)]) == 1
    assert drift_gauge(world, "ctr_ratio") == pytest.approx((2 / 5) / (2 / 10))


def test_a_redelivered_click_is_not_counted_again_for_the_ctr(open_world: Callable[..., World]) -> None:
    world = open_world(drift_reference_size=10)
    drift = RecordingDrift(world.services.drift)
    world.services.drift = drift
    world.catalogue()
    served = ids(world.recommend("fan", k=3))
    click = world.click("fan", served[0], position=0)
    assert apply_interactions(world.services, [click]) == 1
    # The same record again, as after a consumer restart before its commit, in a batch with a
    # new event: skipped as a duplicate, so it is not a second click on the served list either.
    assert apply_interactions(world.services, [click, world.click("fan", "book-4")]) == 1
    assert [u["clicks"] for u in drift.updates if u["clicks"]] == [1]


def test_the_drift_reference_is_the_first_reference_size_scores_and_then_stays(
    open_world: Callable[..., World],
) -> None:
    world = open_world(drift_reference_size=10, drift_window_size=10)
    drift = RecordingDrift(world.services.drift)
    world.services.drift = drift
    world.catalogue()
    apply_interactions(world.services, [world.click("fan", "tent-1"), world.click("reader", "book-1"),
                                        world.click("walker", "shoe-2")])
    for n, user_id in enumerate(["fan", "fan", "reader"]):  # 4 + 4 + 4 scores: the third crosses the cut
        assert drift.results().reference_ready is False, n
        world.respond(user_id, k=4)
    assert drift.results().reference_ready
    reference = drift.updates[:3]
    later_users = ["reader", "walker", "fan"]
    for n in range(12):  # more than a window of requests (2 scores each): the current window is theirs
        world.respond(later_users[n % 3], k=2)
    later = drift.updates[3:]

    ref_scores = np.concatenate([u["scores"] for u in reference])[:10]
    ref_vectors = np.stack([u["user_vector"] for u in reference])
    ref_served = [item_id for u in reference for item_id in u["served"]][:10]
    cur_scores = np.concatenate([u["scores"] for u in later])[-10:]
    cur_vectors = np.stack([u["user_vector"] for u in later])[-10:]
    cur_served = [item_id for u in later for item_id in u["served"]][-10:]
    served_counts = Counter({item_id: 0 for item_id in ref_served})
    served_counts.update(cur_served)
    results = drift.results()
    assert results.score_psi == pytest.approx(psi(ref_scores, cur_scores))
    assert results.embedding_shift == pytest.approx(dimension_psi(ref_vectors, cur_vectors))
    assert results.popularity_gini == pytest.approx(gini(np.array(list(served_counts.values()))))
    # Not vacuous: a reference that kept taking scores would measure something else.
    everything = np.concatenate([u["scores"] for u in drift.updates])
    assert psi(everything, cur_scores) != pytest.approx(results.score_psi)
    assert drift_gauge(world, "score_psi") == pytest.approx(results.score_psi)
    assert drift_gauge(world, "embedding_shift") == pytest.approx(results.embedding_shift)


def test_a_swap_starts_a_new_drift_reference(open_world: Callable[..., World]) -> None:
    import copy

    from stream.swap import build_state, install

    world = open_world(drift_reference_size=10, drift_window_size=10)
    services = world.services
    world.catalogue()
    apply_interactions(services, [world.click("fan", "tent-1"), world.click("walker", "shoe-2")])
    for user_id in ("fan", "walker", "fan"):  # a full reference and five current scores
        world.respond(user_id, k=5)
    assert services.drift.results().reference_ready
    assert drift_gauge(world, "popularity_gini") > 0.0

    next_version = copy.copy(services.model)
    next_version.version = "next"  # type: ignore[misc]
    install(services, build_state(services, next_version))
    assert services.model.version == "next"
    assert services.drift.results() == DriftResults(0.0, 0.0, 1.0, 0.0, False, ())
    assert drift_gauge(world, "popularity_gini") == 0.0
    # The new version's reference takes the next ten scores, as the first one did, and the
    # current window starts empty too (the five scores from before the swap are gone).
    world.respond("fan", k=5)
    assert not services.drift.results().reference_ready
    world.respond("walker", k=5)
    assert services.drift.results() == DriftResults(0.0, 0.0, 1.0, 0.0, True, ())
    world.respond("fan", k=5)
    assert services.drift.results().score_psi > 0.0 or services.drift.results().popularity_gini > 0.0


def test_serving_a_few_items_far_more_than_others_raises_the_popularity_alert(
    open_world: Callable[..., World],
) -> None:
    """Gini over how often each item was served, with the items the reference served counting
    as zeros: a worker that narrows to two of forty items crosses the alert rule's threshold."""
    threshold = alert_threshold("streamrec_drift_popularity_gini")
    world = open_world(drift_reference_size=40, drift_window_size=40)
    assert world.services.drift.thresholds.popularity_gini == threshold
    kinds = ["tent", "boot", "novel", "kettle", "lamp", "scarf", "bike", "clock"]
    world.catalogue([(f"{kind}-{n}", f"{colour} {kind} number {n}", kind, 10.0 + n)
                     for kind in kinds for n, colour in enumerate(["red", "green", "blue", "black", "white"])])
    assert len(world.item_ids()) == 40
    assert len(world.recommend("first-visitor", k=40)) == 40  # the reference: every item once
    assert len(world.recommend("second-visitor", k=40)) == 40  # the current window: every item once
    assert drift_gauge(world, "popularity_gini") == pytest.approx(0.0)

    apply_interactions(world.services, [world.click("fan", "tent-0", "purchase")])
    narrow = [ids(world.recommend("fan", k=2)) for _ in range(20)]  # the current window: 40 served ids
    assert len({item_id for answer in narrow for item_id in answer}) == 2, narrow
    concentration = drift_gauge(world, "popularity_gini")
    assert concentration == pytest.approx(gini(np.array([20] * 2 + [0] * 38)))
    assert concentration > threshold
    assert "popularity_gini" in world.services.drift.results().alerts
