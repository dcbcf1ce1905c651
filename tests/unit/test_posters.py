"""``streamrec demo --posters DIR``: the folder is checked at start, films map to the demo's item ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.posters import genre_overlap, load_posters
from core.errors import ConfigError
from core.events import CatalogItem

KNOWN = {f"m{n}" for n in range(1, 11)}


def film(item_id: object, **fields: object) -> dict[str, object]:
    return {"item_id": item_id, "title": f"Film {item_id} (1995)", "genres": ["Drama"],
            "description": f"The plot of film {item_id}.", "director": ["A. Director"], "cast": ["B. Actor", "nan"],
            "poster": f"posters/{item_id}.jpg", **fields}


def folder(tmp_path: Path, films: list[dict[str, object]] | str, posters: tuple[int, ...] = (1, 2, 3)) -> Path:
    root = tmp_path / "movielens-posters"
    (root / "posters").mkdir(parents=True)
    for number in posters:
        (root / "posters" / f"{number}.jpg").write_bytes(b"\xff\xd8 not decoded here")
    # One key per line, as the shared folder's items.json is written.
    text = films if isinstance(films, str) else json.dumps(films, indent=0)
    (root / "items.json").write_text(text)
    return root


def line_of(root: Path, needle: str) -> int:
    """The line where the film holding ``needle`` starts (its opening brace)."""
    lines = (root / "items.json").read_text().splitlines()
    hit = next(n for n, line in enumerate(lines) if needle in line)
    return max(n for n in range(hit + 1) if lines[n].strip() == "{") + 1


def test_films_map_to_the_demos_item_ids_with_plot_and_poster(tmp_path: Path) -> None:
    root = folder(tmp_path, [film(1), film(2, description="It looks like we don't have any Plot Summaries for "
                                                         "this title yet."),
                             film(3, poster_is_placeholder=True), film(4, poster=None, description_year_mismatch=True)])
    posters = load_posters(root, KNOWN)
    assert sorted(posters.films) == ["m1", "m2", "m3", "m4"]
    assert [f.item_id for f in posters.with_poster] == ["m1", "m2"]  # 3's is a grey title card, 4 has none
    assert posters.films["m2"].description == "" and posters.films["m4"].description == ""
    assert posters.poster_bytes("m1").startswith(b"\xff\xd8")
    movielens = [CatalogItem(event_id=f"ml-item-{n}", event_time=1.0, item_id=f"m{n}", title=f"film {n}",
                             category="Drama", attributes={"genres": "Drama", "year": "1995"}) for n in (1, 3, 9)]
    items = {item.item_id: item for item in posters.catalogue(movielens)}
    assert items["m1"].image is not None and items["m1"].image.image_uri == "posters/1.jpg"
    assert items["m1"].description == "The plot of film 1." and items["m1"].title == "Film 1 (1995)"
    assert items["m1"].attributes == {"genres": "Drama", "year": "1995", "director": "A. Director", "cast": "B. Actor"}
    assert items["m3"].image is None and items["m3"].description == "The plot of film 3."
    assert items["m9"] == movielens[2]  # not in the folder: the plain MovieLens record
    assert genre_overlap(posters.films, "m1", ["m1", "m2", "m9"]) == 1  # m2 (Drama); m1 itself and m9 not counted
    # Only some films (the demo's replayed ones): the others keep their plain record.
    only = {item.item_id: item for item in posters.catalogue(movielens, only={"m3"})}
    assert only["m1"] == movielens[0] and only["m3"].description == "The plot of film 3."


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "absent", "no such folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "items.json is missing"),
])
def test_a_missing_folder_or_items_file_is_named(tmp_path: Path, make, expected: str) -> None:  # type: ignore[no-untyped-def]
    root = make(tmp_path)
    with pytest.raises(ConfigError, match=expected) as error:
        load_posters(root, KNOWN)
    assert str(root) in str(error.value)


def test_a_missing_posters_folder_is_named(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    (root / "items.json").write_text(json.dumps([film(1)]))
    with pytest.raises(ConfigError, match=f"the folder {root / 'posters'} is missing"):
        load_posters(root, KNOWN)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    root = folder(tmp_path, '[\n{"item_id": 1,\n "title": "x"\n "genres": []}\n]')
    with pytest.raises(ConfigError, match=rf"{root / 'items.json'}:4: not JSON"):
        load_posters(root, KNOWN)


def test_not_a_list_is_named(tmp_path: Path) -> None:
    root = folder(tmp_path, '{"item_id": 1}')
    with pytest.raises(ConfigError, match=rf"{root / 'items.json'}:1: expected a JSON list of films"):
        load_posters(root, KNOWN)


@pytest.mark.parametrize("bad, expected", [
    (film("one"), "item_id must be a MovieLens film number, not 'one'"),
    (film(99), r"item_id 99 is not a MovieLens-100k film \(the demo's items are m1..m10\)"),
    (film(3, title=None), "film 3: title must be a string"),
    (film(3, genres="Drama"), "film 3: genres must be a list of strings"),
    (film(3, description=["a"]), "film 3: description must be a string or null"),
    (film(5), r"film 5: poster file .*posters/5.jpg is missing"),
    (film(3, poster="../../etc/passwd"), "film 3: poster '../../etc/passwd' is outside"),
    (film(2, marker="dup"), "film 2 is listed twice"),
    ("not a film", "a film must be a JSON object, not str"),
])
def test_a_bad_film_names_file_and_line(tmp_path: Path, bad: object, expected: str) -> None:
    marked = bad if not isinstance(bad, dict) else {**bad, "marker": "bad"}
    root = folder(tmp_path, [film(1), film(2), marked, film(3)])
    if isinstance(bad, dict):
        line = line_of(root, '"marker": "bad"')
    else:
        line = next(n for n, text in enumerate((root / "items.json").read_text().splitlines(), 1) if bad in text)
    with pytest.raises(ConfigError, match=rf"{root / 'items.json'}:{line}: {expected}"):
        load_posters(root, KNOWN)


def test_a_folder_without_any_poster_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path, [film(1, poster=None), film(2, poster=None)], posters=())
    with pytest.raises(ConfigError, match="no film in .*items.json has a poster"):
        load_posters(root, KNOWN)
