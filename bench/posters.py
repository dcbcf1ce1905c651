"""``streamrec demo --posters DIR``: the MovieLens films with their real posters and plots.

DIR is laid out as the shared ``movielens-posters`` folder: ``items.json`` (a
list of films: ``item_id``, ``title``, ``genres``, ``description``,
``director``, ``cast``, ``poster`` as a path under DIR or null, and quality
flags) and ``posters/<item_id>.jpg``. Its ``item_id`` is the MovieLens-100k
film id, so film 50 is the demo's item ``m50``; the demo's ratings still come
from MovieLens-100k (``bench.movielens``), which they are the same as.

A film of DIR gets its plot as the catalogue item's ``description`` and its
poster as the item's photo, by URI relative to DIR (workers read it with
``STREAMREC_IMAGE_ROOT=DIR``, as any catalogue photo given by path). Films
DIR does not list keep their plain MovieLens record. Plots flagged as scraped
from a remake (``description_year_mismatch``) or the scraper's "no plot yet"
page, and grey title-card posters (``poster_is_placeholder``), are left out:
such a film is listed without that modality.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.events import CatalogItem, ImageRef, RecRequest, RecResponse
from core.settings import Settings

ITEMS_FILE = "items.json"
POSTERS_FOLDER = "posters"
NO_PLOT_MARK = "don't have any Plot Summaries"  # the scraper's page for a film without a plot


@dataclass(frozen=True)
class Film:
    item_id: str  # the demo's id: "m" + the MovieLens id
    title: str
    genres: tuple[str, ...]
    description: str  # "" when absent or unusable
    poster: str | None  # path relative to the folder, None when absent or a placeholder
    people: dict[str, str]  # director, cast: comma-separated names (catalogue attributes)


@dataclass(frozen=True)
class PostersFolder:
    root: Path
    films: dict[str, Film]

    @property
    def with_poster(self) -> list[Film]:
        return [film for film in self.films.values() if film.poster]

    def poster_bytes(self, item_id: str) -> bytes:
        poster = self.films[item_id].poster
        if poster is None:
            raise ConfigError(f"{self.root}: film {item_id} has no poster")
        return (self.root / poster).read_bytes()

    def catalogue(self, movielens: list[CatalogItem], only: set[str] | None = None) -> list[CatalogItem]:
        """The MovieLens catalogue events, those of the folder's films (of ``only``, when given)
        with plot and poster."""
        items = []
        for item in movielens:
            film = self.films.get(item.item_id)
            if film is None or (only is not None and item.item_id not in only):
                items.append(item)
                continue
            items.append(item.model_copy(update={
                "title": film.title or item.title,
                "description": film.description,
                "attributes": {**item.attributes, **film.people},
                "image": ImageRef(image_uri=film.poster) if film.poster else None,
            }))
        return items


def _records(path: Path) -> list[tuple[int, Any]]:
    """(line, record) of each element of the JSON list in ``path``."""
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except ValueError as error:
        line = getattr(error, "lineno", "?")
        raise ConfigError(f"{path}:{line}: not JSON ({error})") from None
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        raise ConfigError(f"{path}:{text.count(chr(10), 0, position) + 1}: expected a JSON list of films")
    position = _skip_space(text, position + 1)
    records = []
    while not text.startswith("]", position):
        record, end = decoder.raw_decode(text, position)
        records.append((text.count("\n", 0, position) + 1, record))
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
    return records


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _names(value: Any) -> str:
    if not isinstance(value, list):
        return ""
    return ", ".join(str(name) for name in value if isinstance(name, str) and name and name != "nan")


def _film(root: Path, where: str, record: Any, known: set[str] | None) -> Film:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: a film must be a JSON object, not {type(record).__name__}")
    raw_id = record.get("item_id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)) or not str(raw_id).isdigit():
        raise ConfigError(f"{where}: item_id must be a MovieLens film number, not {raw_id!r}")
    item_id = f"m{int(raw_id)}"
    if known is not None and item_id not in known:
        raise ConfigError(f"{where}: item_id {raw_id} is not a MovieLens-100k film (the demo's items are "
                          f"m1..m{len(known)})")
    title = record.get("title")
    if not isinstance(title, str):
        raise ConfigError(f"{where}: film {raw_id}: title must be a string, not {title!r}")
    genres = record.get("genres") or []
    if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
        raise ConfigError(f"{where}: film {raw_id}: genres must be a list of strings, not {genres!r}")
    description = record.get("description")
    if description is not None and not isinstance(description, str):
        raise ConfigError(f"{where}: film {raw_id}: description must be a string or null, not {description!r}")
    if not description or NO_PLOT_MARK in description or record.get("description_year_mismatch"):
        description = ""
    poster = record.get("poster")
    if poster is not None:
        if not isinstance(poster, str) or not poster:
            raise ConfigError(f"{where}: film {raw_id}: poster must be a path under {root} or null, not {poster!r}")
        path = (root / poster).resolve()
        if not path.is_relative_to(root.resolve()):
            raise ConfigError(f"{where}: film {raw_id}: poster {poster!r} is outside {root}")
        if not path.is_file():
            raise ConfigError(f"{where}: film {raw_id}: poster file {root / poster} is missing")
        if record.get("poster_is_placeholder"):
            poster = None
    people = {name: _names(record.get(name)) for name in ("director", "cast")}
    return Film(item_id, title.strip(), tuple(genres), description.strip(), poster,
                {name: names for name, names in people.items() if names})


def load_posters(folder: Path, known_items: set[str] | None = None) -> PostersFolder:
    """Read and check DIR; ``known_items``: the demo's item ids each film must be one of.

    Fails (``ConfigError``) naming the path, and the file and line of a bad film."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--posters {root}: no such folder (expected {ITEMS_FILE} and {POSTERS_FOLDER}/ in it)")
    items_path = root / ITEMS_FILE
    if not items_path.is_file():
        raise ConfigError(f"--posters {root}: {items_path} is missing (the films' titles, plots and poster paths)")
    if not (root / POSTERS_FOLDER).is_dir():
        raise ConfigError(f"--posters {root}: the folder {root / POSTERS_FOLDER} is missing (the poster JPEGs)")
    films: dict[str, Film] = {}
    for line, record in _records(items_path):
        film = _film(root, f"{items_path}:{line}", record, known_items)
        if film.item_id in films:
            raise ConfigError(f"{items_path}:{line}: film {film.item_id[1:]} is listed twice")
        films[film.item_id] = film
    folder_view = PostersFolder(root, films)
    if not folder_view.with_poster:
        raise ConfigError(f"--posters {root}: no film in {items_path} has a poster")
    return folder_view


def genre_overlap(films: dict[str, Film], item_id: str, others: list[str]) -> int:
    """How many of ``others`` (``item_id`` itself left out) share a genre with film ``item_id``."""
    genres = set(films[item_id].genres)
    return sum(1 for other in others if other != item_id and other in films and genres & set(films[other].genres))


async def visual_search(settings: Settings, posters: PostersFolder, item_id: str, k: int = 5) -> RecResponse:
    """POST /recommend with the poster of ``item_id`` (inline JPEG) for a user with no history."""
    from stream.client import http_recommend

    request = RecRequest(request_id=uuid.uuid4().hex, user_id=f"visual-searcher-{uuid.uuid4().hex[:6]}", k=k,
                         image=ImageRef(image_b64=base64.b64encode(posters.poster_bytes(item_id)).decode()))
    return await http_recommend(settings, request)


async def show_visual_search(settings: Settings, posters: PostersFolder, item_id: str, k: int = 5) -> RecResponse:
    """The visual search with one real poster, printed: the films found, where the poster's own
    film came, and how many found films share a genre with it."""
    film = posters.films[item_id]
    started = time.perf_counter()
    response = await visual_search(settings, posters, item_id, k)
    found = [item.item_id for item in response.items]
    print(f"    visual search with the poster of {film.title} ({'|'.join(film.genres)}), as an inline JPEG "
          f"(POST /recommend, {1000 * (time.perf_counter() - started):.0f} ms):")
    for rank, item in enumerate(response.items, 1):
        genres = "|".join(posters.films[item.item_id].genres) if item.item_id in posters.films else ""
        print(f"      {rank}. {item.title or item.item_id:<45.45}  {item.score:.3f}  {genres:<30.30}  {item.reason}")
    rank = found.index(item_id) + 1 if item_id in found else None
    others = len([other for other in found if other != item_id])
    print(f"    the poster's own film: {f'rank {rank}' if rank else f'not in the top {k}'}; other films found "
          f"sharing a genre with it: {genre_overlap(posters.films, item_id, found)} of {others}")
    return response
