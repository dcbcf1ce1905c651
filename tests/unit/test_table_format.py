"""The general input format: interaction tables, catalogues, bad rows, missing modalities."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ConfigError
from model.nets.towers import ItemTower, TowerConfig
from model.training.content_vectors import crop_centre, encode_images
from model.training.data import load_table
from model.training.table_format import (
    parse_field_map,
    read_catalogue,
    read_interactions,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def photo(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (60, 90)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def catalogue_dir(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    photo(images / "a.jpg", (200, 30, 30))
    photo(images / "b.jpg", (30, 30, 200))
    records = [
        {"id": "a", "title": "Red one", "description": "A red thing.", "genres": ["Drama", "War"],
         "poster": "a.jpg"},
        {"id": "b", "title": "Blue one", "genres": ["Drama"], "poster": f"file://{images / 'b.jpg'}"},
        {"id": "c", "title": "No photo", "description": "Only words.", "genres": [], "poster": None},
        {"id": "d"},  # nothing but an id: every modality missing
    ]
    write(tmp_path / "catalogue.json", json.dumps(records, indent=1))
    return tmp_path


def test_tsv_csv_and_jsonl_give_the_same_sequences(tmp_path: Path) -> None:
    tsv = write(tmp_path / "x.tsv", "user_id\titem_id\trating\ttimestamp\nu1\ta\t5\t30\nu1\tb\t3\t10\nu2\ta\t4\t5\n")
    csv = write(tmp_path / "x.csv", "time,user,item,action\n30,u1,a,view\n10,u1,b,purchase\n5,u2,a,view\n")
    jsonl = write(tmp_path / "x.jsonl", "\n".join(json.dumps(row) for row in [
        {"user_id": "u1", "item_id": "a", "timestamp": 30}, {"user_id": "u1", "item_id": "b", "timestamp": 10},
        {"user_id": "u2", "item_id": "a", "timestamp": 5, "action": "click"}]) + "\n\n")
    for path in (tsv, csv, jsonl):
        data = load_table(path)
        assert data.item_ids == ["a", "b"] and data.user_ids == ["u1", "u2"]
        # u1 is ordered by time: b (10) before a (30).
        assert [s.tolist() for s in data.sequences] == [[2, 1], [1]]
        assert data.timestamps is not None and data.timestamps[0].tolist() == [10.0, 30.0]
    assert load_table(csv).action == "view"
    assert load_table(tsv).action is None


@pytest.mark.parametrize("text, line, reason", [
    ("user_id\titem_id\ttimestamp\nu1\ta\t1\nu1\tb\tsoon\n", 3, "timestamp must be a number"),
    ("user_id\titem_id\ttimestamp\nu1\ta\t1\nu1\tb\n", 3, "2 fields, the header has 3"),
    ("user_id\titem_id\ttimestamp\taction\nu1\ta\t1\tview\n\nu1\tb\t2\tlike\n", 4, "unknown action 'like'"),
    ("user_id\titem_id\ttimestamp\n\tb\t2\n", 2, "empty user_id"),
    ("user_id\tproduct\ttimestamp\nu1\ta\t1\n", 1, "'item_id or item'"),
])
def test_a_bad_interaction_row_names_file_and_line(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path / "bad.tsv", text)
    with pytest.raises(ConfigError) as error:
        read_interactions(path)
    assert f"{path}:{line}:" in str(error.value) and reason in str(error.value)


def test_bad_jsonl_rows_and_unknown_extensions(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", '{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "u", \n')
    with pytest.raises(ConfigError, match=f"{path}:2: not valid JSON"):
        read_interactions(path)
    with pytest.raises(ConfigError, match="are .tsv, .csv or .jsonl"):
        read_interactions(write(tmp_path / "x.txt", "user_id item_id timestamp\n"))


def test_catalogue_fields_images_and_missing_modalities(catalogue_dir: Path) -> None:
    interactions = write(catalogue_dir / "x.tsv", "user\titem\ttime\nu1\ta\t1\nu1\tb\t2\nu1\tc\t3\nu2\tz\t1\n")
    data = load_table(interactions, catalogue_dir / "catalogue.json", catalogue_dir / "images",
                      parse_field_map("category=genres,image=poster"))
    # Catalogue-only item d is listed; z has interactions but no catalogue entry.
    assert data.item_ids == ["a", "b", "c", "d", "z"]
    assert data.attribute_names == ["Drama", "War"]
    assert data.attributes[1].tolist() == [1, 2] and data.attributes[3].tolist() == [0, 0]
    assert data.titles is not None and data.titles[3] == "No photo" and data.titles[4] == ""
    assert data.descriptions is not None and data.descriptions[2] == ""
    assert data.images is not None
    assert [p.name if p else None for p in data.images] == [None, "a.jpg", "b.jpg", None, None, None]


@pytest.mark.parametrize("record, reason", [
    ({"id": "x", "poster": "../secret.jpg"}, "outside the image root"),
    ({"id": "x", "poster": "missing.jpg"}, "image file not found"),
    ({"id": "x", "poster": "https://example.com/x.jpg"}, "only local paths and file:// URIs"),
    ({"id": "x", "genres": 7}, "category must be a string or a list"),
    ({"title": "no id"}, "empty item_id"),
    ({"id": "a"}, "listed twice"),
])
def test_a_bad_catalogue_record_names_file_and_line(catalogue_dir: Path, record: dict, reason: str) -> None:
    (catalogue_dir / "secret.jpg").write_bytes(b"")
    records = [{"id": "a", "title": "fine"}, record]
    path = write(catalogue_dir / "bad.json", "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    with pytest.raises(ConfigError) as error:
        read_catalogue(path, catalogue_dir / "images", parse_field_map("category=genres,image=poster"))
    assert f"{path}:3:" in str(error.value) and reason in str(error.value)


def test_catalogue_jsonl_and_field_map_errors(catalogue_dir: Path) -> None:
    path = write(catalogue_dir / "c.jsonl", '{"item_id": "a", "category": "Drama|War", "attributes": {"c": "red"}}\n'
                 '{"item_id": "b", "image": {"image_uri": "a.jpg"}}\n')
    with pytest.raises(ConfigError, match=f"{path}:2: the catalogue names an image"):
        read_catalogue(path, None)
    records = read_catalogue(path, catalogue_dir / "images")
    assert records[0].categories == ("Drama", "War", "c=red") and records[1].image is not None
    with pytest.raises(ConfigError, match="bad catalogue field mapping"):
        parse_field_map("colour=genres")


def test_source_fields_become_attributes_and_a_year_is_read_from_a_date(tmp_path: Path) -> None:
    records = [
        {"id": "a", "genres": ["Drama"], "release_date": "01-Jan-1995", "lang": "en"},
        {"id": "b", "genres": "Comedy|Drama", "release_date": 1998, "attributes": {"colour": "red"}},
        {"id": "c", "release_date": ""},  # no date: no year attribute, as with any missing field
        {"id": "d", "release_date": "1971-02-04", "lang": None},
    ]
    path = write(tmp_path / "c.json", json.dumps(records))
    mapping = parse_field_map("category=genres,attributes.year=release_date:year,attributes.language=lang")
    got = {record.item_id: record.categories for record in read_catalogue(path, None, mapping)}
    assert got == {"a": ("Drama", "year=1995", "language=en"), "b": ("Comedy", "Drama", "colour=red", "year=1998"),
                   "c": (), "d": ("year=1971",)}
    # The trainer's vocabulary holds them like any other attribute.
    interactions = write(tmp_path / "x.tsv", "user\titem\ttime\nu1\ta\t1\nu1\tb\t2\n")
    data = load_table(interactions, path, None, mapping)
    assert "year=1995" in data.attribute_names and "year=1971" in data.attribute_names


@pytest.mark.parametrize("value, reason", [
    ("sometime in spring", "holds no four-digit year for attribute 'year'"),
    (["1995"], "must be a string or a number to be attribute 'year'"),
])
def test_a_date_without_a_year_names_file_and_line(tmp_path: Path, value: object, reason: str) -> None:
    path = write(tmp_path / "c.json", "[\n" + json.dumps({"id": "a", "released": "1990"}) + ",\n"
                 + json.dumps({"id": "b", "released": value}) + "\n]\n")
    with pytest.raises(ConfigError) as error:
        read_catalogue(path, None, parse_field_map("attributes.year=released:year"))
    assert f"{path}:3:" in str(error.value) and reason in str(error.value)


@pytest.mark.parametrize("text", ["attributes.=released", "attributes.year=", "attributes.year=released:month",
                                  "attributes.a|b=released"])
def test_a_bad_attribute_mapping_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="bad catalogue field mapping"):
        parse_field_map(text)


def test_an_item_missing_a_modality_gets_the_learned_missing_vector() -> None:
    torch.manual_seed(0)
    config = TowerConfig(n_items=3, n_attributes=2, max_attributes=1, fused_dim=8, text_dim=4, image_dim=6)
    tower = ItemTower(config).eval()
    with torch.no_grad():
        tower.missing_image.copy_(torch.arange(8.0))
        tower.missing_text.fill_(0.5)
    index, attributes = torch.tensor([1, 1]), torch.tensor([[1], [1]])
    text, image = torch.randn(2, 4), torch.randn(2, 6)
    with torch.no_grad():
        base = tower.item_embedding(index) + tower.attribute_vectors(attributes)
        out = tower(index, attributes, text, image, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        # Row 0 has text, no photo; row 1 a photo, no text.
        torch.testing.assert_close(out[0], base[0] + tower.text_projection(text[0]) + tower.missing_image)
        torch.testing.assert_close(out[1], base[1] + tower.missing_text + tower.image_projection(image[1]))
        # The catalogue path of training computes the same vectors.
        mixing = torch.sparse_coo_tensor(torch.tensor([[1, 2], [1, 1]]), torch.ones(2), (4, 3),
                                         check_invariants=True).coalesce()
        rows = tower.catalogue_vectors(mixing, torch.cat([torch.zeros(1, 4), text, text[:1]]),
                                       torch.tensor([0.0, 1.0, 0.0, 1.0]),
                                       torch.cat([torch.zeros(1, 6), image, image[:1]]),
                                       torch.tensor([0.0, 0.0, 1.0, 0.0]), id_rows=torch.tensor([0, 1, 1, 3]))
        torch.testing.assert_close(rows[1:3], out)
    # Weights saved before the missing vectors existed load as zeros.
    old = {k: v for k, v in tower.state_dict().items() if not k.startswith("missing_")}
    fresh = ItemTower(config)
    fresh.load_state_dict(old)
    assert not fresh.missing_image.any()


def test_photo_vectors_are_cached_by_content(models_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    red, blue = photo(tmp_path / "red.jpg", (220, 20, 20)), photo(tmp_path / "blue.jpg", (20, 20, 220))
    broken = write(tmp_path / "broken.jpg", "not a jpeg")
    towers, cache = models_dir / "towers", tmp_path / "cache"
    vectors, present = encode_images([None, red, blue, broken], towers, cache, progress=False)
    assert present.tolist() == [False, True, True, False]
    assert not vectors[0].any() and not vectors[3].any()
    np.testing.assert_allclose(np.linalg.norm(vectors[1:3], axis=1), 1.0, rtol=1e-4)
    assert float(vectors[1] @ vectors[2]) < 0.999
    # Second pass: same bytes -> read from the cache, the tower is never opened.
    from model.training import content_vectors

    monkeypatch.setattr(content_vectors.ImageEncoder, "from_dir", lambda *a, **k: pytest.fail("re-encoded"))
    again, _ = encode_images([None, red, blue], towers, cache, progress=False)
    np.testing.assert_array_equal(again, vectors[:3])
    # A changed photo is new content: it is encoded again.
    photo(red, (20, 220, 20))
    with pytest.raises(pytest.fail.Exception, match="re-encoded"):
        encode_images([red], towers, cache, progress=False)


def test_crop_centre_keeps_the_middle() -> None:
    pixels = np.zeros((3, 10, 10), np.float32)
    pixels[:, 3:7, 3:7] = 1.0
    cropped = crop_centre(pixels, 0.4)
    assert cropped.shape == (3, 10, 10) and cropped.min() == 1.0
