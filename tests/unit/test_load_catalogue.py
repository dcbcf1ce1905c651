"""``streamrec load-catalogue``: a catalogue file into a stopped worker's store, then served from it.

Real components, as in ``test_services_inprocess``: the command runs in this
process on a temporary data dir, and a ``Services`` opened on that data dir
afterwards (a worker starting) must serve what was loaded.
"""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.events import CatalogItem
from streamrec.cli import main
from tests.unit.world import CATALOGUE, CATEGORY, T0, World, ids


@pytest.fixture
def catalogue_file(tmp_path: Path) -> Path:
    """The test catalogue, one item per line, with a bad line 5 and a blank line 8."""
    lines = [
        CatalogItem(event_id=f"load-{n}", event_time=T0, item_id=item_id, title=title, category=category,
                    price=price).model_dump_json(exclude_none=True)
        for n, (item_id, title, category, price) in enumerate(CATALOGUE)
    ]
    lines.insert(4, '{"item_id": "broken", "title": "a row without event_id and event_time"}')
    lines.insert(7, "")
    path = tmp_path / "catalogue.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def load_catalogue(models_dir: Path, tmp_path: Path, open_world: Callable[..., World],
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., int]]:
    """``streamrec load-catalogue ARGS`` on the data dir ``open_world`` opens (``tmp_path / "state"``)."""
    previous = signal.getsignal(signal.SIGTERM)  # main() makes SIGTERM raise SystemExit
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STREAMREC_MODEL_DIR", str(models_dir))
    try:
        yield lambda *args: main(["load-catalogue", *map(str, args), "--quiet"])
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_catalogue_file_loads_past_a_bad_line_and_a_worker_serves_it(
    load_catalogue: Callable[..., int], catalogue_file: Path, open_world: Callable[..., World],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert load_catalogue(catalogue_file, "--batch-size", 5) == 1  # 1: a line was rejected
    out, err = capsys.readouterr()
    assert f"loaded {len(CATALOGUE)} items, rejected 1" in out
    assert f"{catalogue_file}:5: missing_field" in err

    world = open_world()
    assert world.item_ids() == set(CATEGORY)
    served = ids(world.recommend("camper", k=3, query="camping tent"))
    assert len(served) == 3 and all(CATEGORY[item_id] == "tents" for item_id in served), served


def test_loading_into_the_store_of_a_running_worker_fails_clearly(
    load_catalogue: Callable[..., int], catalogue_file: Path, open_world: Callable[..., World],
    capsys: pytest.CaptureFixture[str],
) -> None:
    world = open_world()  # the worker holds its embedded store
    assert load_catalogue(catalogue_file) == 1
    err = capsys.readouterr().err
    assert "open in another process" in err and "stop the worker" in err, err
    assert world.item_ids() == set()
