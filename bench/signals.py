"""``streamrec bench signals``: what the signal log costs a click batch, a snapshot and a restart.

On a bare qdrant-edge store in a temporary folder, ``--batches`` batches of
``--clicks`` synthetic clicks (over ``--items`` items, each after 3 earlier
items) go through ``SignalLog.learning`` as ``stream.users`` sends them: the
log entry, then the batch's users (synthetic payloads of a real user's size:
a 64-d vector, 50 items, 256 recent event ids), then the publishing in
memory, with a snapshot every ``--snapshot-every`` entries. Reported: the
median milliseconds of each step per batch, the seconds of each snapshot, and
the seconds a restart takes to restore the state, which must be identical.
"""
from __future__ import annotations

import random
import statistics
import time

import numpy as np

from bench.common import bench_parser, report, work_dir
from core.events import ClickEvent
from core.settings import load_settings
from stream.covisit import StreamTransitions
from stream.kafka import Delivery
from stream.rwlock import ReadWriteLock
from stream.signals import SignalLog
from stream.store import CollectionSpec, Point
from stream.store.edge import EdgeStore
from stream.trending import Trending

USERS = "users"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("signals", __doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--clicks", type=int, default=500, help="clicks per batch")
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--snapshot-every", type=int, default=50)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    items = [f"item-{n}" for n in range(args.items)]
    with work_dir(args.work_dir, "signals") as folder:
        settings = load_settings(data_dir=folder, signals_snapshot_every=args.snapshot_every)
        store = EdgeStore(settings.store_path)
        store.ensure_collection(CollectionSpec(USERS, {"user": 64}, dot=frozenset({"user"})))
        trending, covisit = Trending(settings.trending_half_life_s), StreamTransitions(settings.covisit_items)
        signals = SignalLog.open(store, settings, trending, covisit, ReadWriteLock())
        logged, stored, published, snapshots = [], [], [], []
        offset = 0
        for batch in range(args.batches):
            learnt = signals.lesson(time.time())
            for _ in range(args.clicks):
                event = ClickEvent(event_id=f"e{offset}", user_id=f"u{offset % 5000}", item_id=rng.choice(items),
                                   event_time=1.7e9 + offset)
                learnt.add_click(Delivery(event, "clicks", offset % 4, offset), rng.sample(items, 3))
                offset += 1
            users = [Point(f"u{n}", {"user": np.random.default_rng(n).random(64, np.float32) + 0.1},
                           {"items": rng.sample(items, 50), "recent_ids": "\n".join(f"e{k}" for k in range(256))})
                     for n in range(args.clicks)]
            started = time.perf_counter()
            with signals.learning(learnt):
                entered = time.perf_counter()
                store.upsert(USERS, users)
                left = time.perf_counter()
            done = time.perf_counter()
            logged.append(entered - started)
            stored.append(left - entered)
            # Every teaching batch is one entry: a snapshot follows each snapshot_every-th.
            (snapshots if (batch + 1) % args.snapshot_every == 0 else published).append(done - left)
        held = trending.entries(), covisit.entries()
        store.close()

        started = time.perf_counter()
        store = EdgeStore(settings.store_path)
        restarted_trending = Trending(settings.trending_half_life_s)
        restarted_covisit = StreamTransitions(settings.covisit_items)
        SignalLog.open(store, settings, restarted_trending, restarted_covisit, ReadWriteLock())
        restore_seconds = time.perf_counter() - started
        identical = (restarted_trending.entries(), restarted_covisit.entries()) == held
        store.close()

    def median_ms(seconds: list[float]) -> float:
        return round(1000 * statistics.median(seconds), 2) if seconds else 0.0

    result = {
        "batches": args.batches,
        "clicks_per_batch": args.clicks,
        "log_write_ms": median_ms(logged),
        "users_upsert_ms": median_ms(stored),
        "publish_ms": median_ms(published),
        "snapshot_seconds": [round(s, 2) for s in snapshots],
        "trending_items": len(held[0][1]),
        "covisit_rows": len(held[1]),
        "covisit_entries": sum(len(pairs) for _, _, pairs in held[1]),
        "log_entries_replayed": args.batches % args.snapshot_every,
        "restore_seconds": round(restore_seconds, 2),
        "identical_after_restart": identical,
    }
    report("signal log cost", result)
    return 0 if identical else 1
