"""Vocabulary growth between two versions (``model.training.vocab``) and the fine-tuner's catalogue log."""
from __future__ import annotations

import json

import pytest
import torch

from core.events import CatalogItem
from finetune.catalogue import CatalogueLog, entry_attribute_names
from model.export.fused import Networks
from model.serving.networks import TowerConfig
from model.training.vocab import grow, grow_networks


def test_known_ids_keep_their_place_and_new_ones_follow_in_first_seen_order() -> None:
    assert grow(["a", "b"], ["c", "a", "d", "c", "b"]) == ["a", "b", "c", "d"]
    assert grow([], ["x", "x", "y"]) == ["x", "y"]


def test_grown_networks_keep_every_learnt_row_and_place_a_new_item_as_it_was_served() -> None:
    torch.manual_seed(0)
    config = TowerConfig(n_items=5, n_attributes=2, max_attributes=1, fused_dim=8, text_dim=4, image_dim=3,
                         max_sequence=6, n_layers=1, n_heads=2)
    parent = Networks.build(config)
    grown = grow_networks(parent, n_items=9, n_attributes=3, max_attributes=2)
    assert (grown.config.n_items, grown.config.n_attributes, grown.config.max_attributes) == (9, 3, 2)
    old, new = parent.item_tower.item_embedding.weight, grown.item_tower.item_embedding.weight
    assert new.shape == (10, 8)
    torch.testing.assert_close(new[:6], old)
    torch.testing.assert_close(new[6:], old[0].expand(4, -1))  # the unknown item's row
    old_attr, new_attr = parent.item_tower.attribute_embedding.weight, grown.item_tower.attribute_embedding.weight
    torch.testing.assert_close(new_attr[:3], old_attr)
    assert not new_attr[3:].any()
    # Everything else is the parent's, unchanged.
    for name in ("user_tower", "ranker"):
        for key, value in parent.module(name).state_dict().items():
            torch.testing.assert_close(grown.module(name).state_dict()[key], value)
    # Until it is trained, a new item is placed as the parent placed it: as an unknown item, by its content.
    with torch.no_grad():
        attributes = torch.tensor([[1]])
        text, image = torch.ones(1, 4), torch.zeros(1, 3)
        flags = (torch.ones(1), torch.zeros(1))
        as_new = grown.item_tower(torch.tensor([7]), attributes, text, image, *flags)
        as_unknown = grown.item_tower(torch.tensor([0]), attributes, text, image, *flags)
    torch.testing.assert_close(as_new, as_unknown)
    with pytest.raises(ValueError, match="only grows"):
        grow_networks(grown, n_items=4, n_attributes=3, max_attributes=2)


def test_the_catalogue_log_keeps_each_items_newest_upsert_and_forgets_deleted_ones(tmp_path) -> None:
    log = CatalogueLog(tmp_path)
    events = [
        CatalogItem(event_id="1", event_time=1.0, item_id="a", title="Old title", category="Toys|Games"),
        CatalogItem(event_id="2", event_time=2.0, item_id="b", title="B", category="Books"),
        CatalogItem(event_id="3", event_time=3.0, item_id="a", title="New title", category="Toys|Games",
                    attributes={"year": "1995"}),
        CatalogItem(event_id="4", event_time=4.0, item_id="b", op="delete"),
    ]
    bad = log.apply([event.to_bytes() for event in events] + [b"{not json"], max_bytes=1 << 20)
    assert bad == 1
    items = log.read()
    assert items == {"a": {"title": "New title", "description": "", "category": "Toys|Games",
                           "attributes": {"year": "1995"}}}
    # The names a trained model reads for an item it does not know: categories, then key=value.
    assert entry_attribute_names(items["a"]) == ("Toys", "Games", "year=1995")
    assert entry_attribute_names({"title": "written before attributes were kept", "category": "Books"}) == ("Books",)
    assert json.loads((tmp_path / "catalogue.json").read_text()) == items
