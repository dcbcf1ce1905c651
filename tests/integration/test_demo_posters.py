"""``streamrec demo --posters DIR`` on a handful of real films, through a real worker.

A small posters folder is built for the test from five real posters and their
records (read from the shared ``movielens-posters`` folder, never copied into
the repository); the films are published as the demo publishes them (plot as
text, poster as the photo, by path under ``STREAMREC_IMAGE_ROOT``), beside
five MovieLens films without a poster; a visual search with each poster
finds that poster's film first.
"""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from bench import movielens
from bench.posters import load_posters, show_visual_search, visual_search
from core.settings import Settings
from tests.integration.helpers import processed, publish, wait_until

pytestmark = pytest.mark.integration
FILMS = 5


@pytest.fixture
def posters_dir(shared_data: Path, tmp_path: Path) -> Path:
    source = shared_data / "movielens-posters"
    if not (source / "items.json").is_file():
        pytest.skip(f"{source} is absent: the real posters and plots come from there")
    films = [f for f in json.loads((source / "items.json").read_text())
             if f.get("poster") and not f.get("poster_is_placeholder")][:FILMS]
    folder = tmp_path / "posters-folder"
    (folder / "posters").mkdir(parents=True)
    for film in films:
        shutil.copyfile(source / film["poster"], folder / film["poster"])
    (folder / "items.json").write_text(json.dumps(films, indent=1))
    return folder


@pytest.fixture
def settings(settings: Settings, posters_dir: Path) -> Settings:
    return settings.model_copy(update={"image_root": posters_dir})


def test_each_poster_finds_its_own_film_first(settings: Settings, stack, posters_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    plain = movielens.catalog_events()
    posters = load_posters(posters_dir, {item.item_id for item in plain})
    with_poster = [film.item_id for film in posters.with_poster]
    assert len(with_poster) == FILMS
    # The folder's films and as many MovieLens films without a poster, as the demo publishes them.
    others = [item for item in plain if item.item_id not in posters.films][:FILMS]
    catalogue = posters.catalogue([item for item in plain if item.item_id in posters.films] + others)
    assert sum(item.image is not None for item in catalogue) == FILMS
    publish(settings, catalogue)
    wait_until(lambda: processed(stack, "catalog") >= len(catalogue), 120, "catalogue applied")
    assert stack.worker.metric("streamrec_deadletter_total") == 0

    for item_id in with_poster:
        response = asyncio.run(visual_search(settings, posters, item_id, k=3))
        assert response.items[0].item_id == item_id, [i.item_id for i in response.items]
        assert response.items[0].reason == "looks like your photo"

    shown = asyncio.run(show_visual_search(settings, posters, with_poster[0], k=3))
    assert shown.items[0].item_id == with_poster[0]
    printed = capsys.readouterr().out
    assert f"visual search with the poster of {posters.films[with_poster[0]].title}" in printed
    assert "the poster's own film: rank 1" in printed
