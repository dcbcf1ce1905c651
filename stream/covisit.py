"""Item-to-item transitions a worker learns from its click stream.

The served model brings the transitions of its training data
(``ServingModel.transitions``, over its item indices); this keeps what the
clicks taught since, by item id, weighted as ``model.serving.covisit`` weighs them, so
that an item bought after another a minute ago is suggested after it now, also
to other users and also for items the model never saw. A request's co-visit
scores add both.

Kept in memory by the worker that applies the clicks, bounded in items and in
successors per item, and restored exactly after a restart from the signal log
(``stream.signals``). A swap to a version with its own table starts the
learning again from that table (the fine-tuner folds the same clicks into the
next version's table).

Each row also keeps the weight it was taught in all (``learnt``), before the
pruning to its heaviest successors. Once a row is pruned its content depends
on the order in which clicks of different partitions were learnt; what it was
taught does not, which is how a run is checked for clicks learnt twice or not
at all (and a row whose entries add up to ``learnt`` was never pruned).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from model.serving.contract import ServingModel
from model.serving.covisit import (
    BACKWARD_SHARE,
    NEIGHBOURS,
    WINDOW,
    CoVisitTable,
    history_scores,
    ranked,
)


def fusion_weight(configured: float | None, model: ServingModel) -> float:
    """The co-visit weight to serve with: the configured one, else the model's."""
    return float(configured) if configured is not None else float(model.covisit_weight)


class StreamTransitions:
    def __init__(self, max_items: int, window: int = WINDOW, neighbours: int = NEIGHBOURS) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.window = window
        self.neighbours = neighbours
        self.max_items = max_items
        self._rows: OrderedDict[str, dict[str, float]] = OrderedDict()  # least recently updated first
        self._learnt: dict[str, float] = {}  # weight taught per row, same keys as _rows
        self.evictions = 0
        # Clicks are learnt in one worker thread while requests read in others.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def learn(self, previous: Sequence[str], item: str) -> None:
        """``item`` followed the user's ``previous`` items (oldest first)."""
        with self._lock:
            for distance, before in enumerate(reversed(list(previous)[-self.window:]), start=1):
                if before == item:
                    continue
                self._add(before, item, 1.0 / distance)
                self._add(item, before, BACKWARD_SHARE / distance)

    def _add(self, source: str, target: str, weight: float) -> None:
        row = self._rows.get(source)
        if row is None:
            if len(self._rows) >= self.max_items:
                # Forget the least recently updated eighth at once, not one row per click.
                for _ in range(max(1, self.max_items // 8)):
                    evicted, _ = self._rows.popitem(last=False)
                    del self._learnt[evicted]
                    self.evictions += 1
            row = self._rows[source] = {}
            self._learnt[source] = 0.0
        else:
            self._rows.move_to_end(source)
        row[target] = row.get(target, 0.0) + weight
        self._learnt[source] += weight
        if len(row) > 2 * self.neighbours:
            # Keep the heaviest: a popular item's row would otherwise grow with every click.
            for key in ranked(row, limit=len(row))[self.neighbours:]:
                del row[key]

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._learnt.clear()

    def row(self, source: str) -> dict[str, float]:
        with self._lock:
            return dict(self._rows.get(source, {}))

    def learnt(self, source: str) -> float:
        """The weight row ``source`` was taught since it was created, pruned entries included."""
        with self._lock:
            return self._learnt.get(source, 0.0)

    def entries(self) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """Everything ``load`` needs to rebuild this exact state: (source, learnt,
        [(target, weight), ...]) per row, least recently updated first."""
        with self._lock:
            return [(source, self._learnt[source], list(row.items())) for source, row in self._rows.items()]

    def load(self, entries: list[tuple[str, float, list[tuple[str, float]]]]) -> None:
        """Replace the rows with those ``entries`` returned, in their order."""
        with self._lock:
            self._rows = OrderedDict((source, dict(row)) for source, _, row in entries)
            self._learnt = {source: learnt for source, learnt, _ in entries}

    def scores(self, history: Sequence[str], table: CoVisitTable | None = None,
               item_index: dict[str, int] | None = None, item_ids: Sequence[str] | None = None) -> dict[str, float]:
        """Co-visit score per item id after ``history`` (oldest first): the stream's
        transitions plus, when given, the model's ``table`` (over ``item_index``)."""
        recent = list(history)[-self.window:]
        with self._lock:
            rows = [dict(self._rows.get(source, {})) for source in recent]
        scores: dict[str, float] = {}
        for recency, row in enumerate(reversed(rows), start=1):
            for target, weight in row.items():
                scores[target] = scores.get(target, 0.0) + weight / recency
        if table is not None and item_index is not None and item_ids is not None:
            known = [item_index.get(source, 0) for source in recent]  # 0: no row
            for index, score in history_scores(table, known, self.window).items():
                target = item_ids[index]
                scores[target] = scores.get(target, 0.0) + score
        return scores
