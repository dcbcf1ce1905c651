"""Catalogue, interactions and recommendations in one process, without a broker.

Real components throughout: the exported towers and rule scorer, a qdrant-edge
store in a temporary folder, and the same ``apply_catalog``,
``apply_interactions`` and ``recommend`` the agents call.
"""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from core.events import (
    CatalogItem,
    ClickEvent,
    ImageRef,
    RecRequest,
    RequestFilters,
    SearchEvent,
)
from core.settings import load_settings
from model.serving.content import ImageEncoder, TextEncoder
from stream.catalog import apply_catalog
from stream.recommend import recommend
from stream.services import Services
from stream.store import SearchFilter
from stream.users import Delivery, apply_interactions

T0 = 1_700_000_000.0
CLICKS, SEARCHES = "events.clicks", "events.searches"

# (item id, title, category, price)
CATALOGUE = [
    ("tent-1", "Two-person backpacking tent", "tents", 240.0),
    ("tent-2", "Family camping tent with a porch", "tents", 410.0),
    ("tent-3", "Ultralight trekking pole tent", "tents", 320.0),
    ("tent-4", "Pop-up dome tent for festivals", "tents", 45.0),
    ("shoe-1", "Trail running shoes", "shoes", 130.0),
    ("shoe-2", "Waterproof hiking boots", "shoes", 180.0),
    ("shoe-3", "Leather city sneakers", "shoes", 95.0),
    ("shoe-4", "Children's beach sandals", "shoes", 25.0),
    ("book-1", "Cookbook of Italian pasta", "books", 30.0),
    ("book-2", "Mystery novel set in Venice", "books", 12.0),
    ("book-3", "Field guide to the birds of Europe", "books", 35.0),
    ("book-4", "History of the Roman empire", "books", 28.0),
]
CATEGORY = {item_id: category for item_id, _, category, _ in CATALOGUE}
PRICE = {item_id: price for item_id, _, _, price in CATALOGUE}


def photo_b64(colour: tuple[int, int, int]) -> str:
    image = Image.new("RGB", (96, 64), colour)
    for x in range(0, 96, 8):  # some structure so the tower sees edges
        image.paste((255 - colour[0], colour[1], 255 - colour[2]), (x, 0, x + 4, 64))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class World:
    """One worker's services plus helpers that number events and offsets like a broker."""

    def __init__(self, services: Services, registry: CollectorRegistry) -> None:
        self.services = services
        self.registry = registry
        self._event_ids = count()
        self._offsets: dict[str, count[int]] = {CLICKS: count(), SEARCHES: count()}

    def catalogue(self, rows: list[tuple[str, str, str, float]] = CATALOGUE) -> None:
        items = [
            CatalogItem(event_id=self.event_id(), event_time=T0, item_id=item_id, title=title,
                        category=category, price=price)
            for item_id, title, category, price in rows
        ]
        assert apply_catalog(self.services, items) == []

    def event_id(self) -> str:
        return f"e{next(self._event_ids)}"

    def delivery(self, event: ClickEvent | SearchEvent, partition: int = 0) -> Delivery:
        topic = CLICKS if isinstance(event, ClickEvent) else SEARCHES
        return Delivery(event, topic, partition, next(self._offsets[topic]))

    def click(self, user_id: str, item_id: str, action: str = "click") -> Delivery:
        event = ClickEvent(event_id=self.event_id(), event_time=T0, user_id=user_id, item_id=item_id,
                           action=action)  # type: ignore[arg-type]
        return self.delivery(event)

    def search(self, user_id: str, query: str) -> Delivery:
        event = SearchEvent(event_id=self.event_id(), event_time=T0, user_id=user_id, query=query)
        return self.delivery(event)

    def recommend(self, user_id: str, k: int = 100, **request: object) -> list[tuple[str, str]]:
        response = recommend(
            self.services,
            RecRequest(request_id=self.event_id(), user_id=user_id, k=k, **request),  # type: ignore[arg-type]
            path="test",
        )
        assert response.error is None
        assert response.user_id == user_id
        assert response.model_version == self.services.model.version
        return [(item.item_id, item.reason) for item in response.items]

    def stored_user(self, user_id: str) -> dict[str, object]:
        users = self.services.store.retrieve(self.services.collections.users, [user_id], with_vectors=True)
        hit = users[user_id]
        return {"payload": hit.payload, "vectors": hit.vectors}

    def item_ids(self) -> set[str]:
        return set(self.services.store.scroll_ids(self.services.collections.items))


@pytest.fixture(scope="module")
def shared_encoders() -> Iterator[None]:
    """Load each exported tower once per module instead of once per test.

    The encoders are stateless ONNX sessions, so every ``Services.open`` below
    still gets the real objects; only the half-second load is shared.
    """
    loaded: dict[tuple[type, Path], object] = {}
    with pytest.MonkeyPatch.context() as patch:
        for encoder in (TextEncoder, ImageEncoder):
            load = encoder.from_dir

            def from_dir(model_dir: Path, *, load=load, encoder=encoder, **options: object) -> object:
                key = (encoder, Path(model_dir).resolve())
                if key not in loaded:
                    loaded[key] = load(model_dir, **options)
                return loaded[key]

            patch.setattr(encoder, "from_dir", from_dir)
        yield


@pytest.fixture
def world(
    models_dir: Path, shared_encoders: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    for name in list(os.environ):
        if name.startswith("STREAMREC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    (tmp_path / "images").mkdir()
    settings = load_settings(
        data_dir=tmp_path / "state", model_dir=models_dir, image_root=tmp_path / "images"
    )
    registry = CollectorRegistry()
    services = Services.open(settings, registry)
    try:
        yield World(services, registry)
    finally:
        services.close()


def ids(results: list[tuple[str, str]]) -> list[str]:
    return [item_id for item_id, _ in results]


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
    assert "tent-3" in ids(world.recommend("fan"))
    assert "tent-1" in ids(world.recommend("stranger"))  # trending

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
    assert "tent-3" in ids(world.recommend("u1"))


def test_exclude_ids_are_honoured(world: World) -> None:
    world.catalogue()
    apply_interactions(world.services, [world.click("u1", "book-1")])
    served = ids(world.recommend("u1", filters=RequestFilters(exclude_ids=["book-2", "book-3"])))
    assert served and not {"book-1", "book-2", "book-3"} & set(served)


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
