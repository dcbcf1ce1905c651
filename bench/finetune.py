"""``streamrec bench finetune``: a fine-tuning cycle, a hot swap under load, drift on two replays.

Everything runs embedded: a broker started here, a store in a work folder, a
registry whose base version is trained here on synthetic data (1,000 items in
10 categories; each user walks one category). Then:

1. ``--events`` new clicks (default 100k) of the same process are published and
   one fine-tuning cycle runs (drain, train, evaluate, promote): ``cycle_seconds``;
2. a worker's services, serving the base version, hot-swap to the promoted one
   while another thread sends requests back to back and a click agent keeps
   applying batches of 20 clicks: every request during the swap window is
   counted, any exception or short answer is a failure, and the longest time
   without a click batch applied during the swap is ``swap_longest_click_gap_seconds``;
3. drift on a stationary replay (the reference and current windows come from
   the same users) and on a shifted one (the users' clicks move to one
   category, so their vectors, scores and clicks change).
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from bench.common import bench_parser, report, stack_settings, start_broker, work_dir
from core.settings import Settings, load_settings

N_ITEMS, N_CATEGORIES = 1000, 10
PER_CATEGORY = N_ITEMS // N_CATEGORIES
T0 = 1_700_000_000.0


def category_of(item: int) -> int:
    return (item - 1) // PER_CATEGORY


def user_walks(users: int, length: int, rng: np.random.Generator, offset: int = 0) -> list[tuple[int, list[int]]]:
    """(category, items) per user: a walk inside one category with small random steps."""
    walks = []
    for _ in range(users):
        category = int(rng.integers(N_CATEGORIES))
        position = int(rng.integers(PER_CATEGORY))
        items = []
        for _ in range(length):
            position = (position + int(rng.integers(1, 4))) % PER_CATEGORY
            items.append(category * PER_CATEGORY + position + 1)
        walks.append((category, items))
    return walks


def train_base(out: Path, rng: np.random.Generator) -> None:
    from model.training.data import InteractionData
    from model.training.ranker import RankerSettings
    from model.training.train import DEFAULT_RETRIEVAL, train_artefact

    walks = user_walks(600, 20, rng)
    attributes = np.zeros((N_ITEMS + 1, 1), dtype=np.int64)
    attributes[1:, 0] = [category_of(i) + 1 for i in range(1, N_ITEMS + 1)]
    data = InteractionData("bench", [f"base{u}" for u in range(len(walks))],
                           [np.asarray(items, dtype=np.int64) for _, items in walks],
                           [f"i{i}" for i in range(1, N_ITEMS + 1)], attributes,
                           [f"c{c}" for c in range(N_CATEGORIES)])
    train_artefact(data, "s3rec", None, out, tower_overrides={"fused_dim": 32, "max_sequence": 30, "n_layers": 1},
                   retrieval=replace(DEFAULT_RETRIEVAL, epochs=6, minutes=0.5, eval_every=3),
                   ranker=RankerSettings(epochs=1), progress=False)


def click_events(walks: list[tuple[int, list[int]]], start_time: float, prefix: str) -> list:  # list[ClickEvent]
    from core.events import ClickEvent

    return [
        ClickEvent(event_id=f"{prefix}{u}-{k}", event_time=start_time + k, user_id=f"u{u}", item_id=f"i{item}",
                   action="click")
        for u, (_, items) in enumerate(walks) for k, item in enumerate(items)
    ]


async def publish_all(settings: Settings, events: list) -> None:
    from stream.client import EventPublisher

    async with EventPublisher(settings) as publisher:
        for event in events:
            await publisher.publish(event)
        await publisher.flush()


class RequestLoad:
    """Back-to-back requests on a thread; counts answers, failures and versions."""

    def __init__(self, services, users: int) -> None:  # type: ignore[no-untyped-def]
        self.services, self.users = services, users
        self.answered: list[tuple[float, str]] = []
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from core.events import RecRequest
        from stream.recommend import recommend

        n = 0
        while not self._stop.is_set():
            n += 1
            request = RecRequest(request_id=f"load{n}", user_id=f"u{n % self.users}", k=10)
            try:
                response = recommend(self.services, request, path="bench")
                if len(response.items) < 10:
                    raise RuntimeError(f"{len(response.items)} items")
                self.answered.append((time.monotonic(), response.model_version))
            except Exception as error:  # counted, never raised: failures are the measurement
                self.failed.append((time.monotonic(), repr(error)))

    def __enter__(self) -> "RequestLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def swap_while_clicking(services, users: int, seed: int = 0,  # type: ignore[no-untyped-def]
                              batch: int = 20) -> tuple[bool, list[float]]:
    """``hot_swap`` while a click agent keeps applying batches of ``batch`` clicks, as the
    worker's agent does (under ``services.write_lock``, the work on a thread); returns
    whether it swapped and the monotonic time at which each batch was applied."""
    from core.events import ClickEvent
    from stream.kafka import Delivery
    from stream.swap import hot_swap
    from stream.users import apply_interactions

    rng = np.random.default_rng(seed)
    applied: list[float] = []
    stop = asyncio.Event()

    async def clicker() -> None:
        offset = 0
        while not stop.is_set():
            deliveries = []
            for _ in range(batch):
                event = ClickEvent(event_id=f"swap-click-{offset}", event_time=time.time(),
                                   user_id=f"u{int(rng.integers(users))}", item_id=f"i{int(rng.integers(1, N_ITEMS + 1))}",
                                   action="click")
                deliveries.append(Delivery(event, "swap-clicks", 0, offset))
                offset += 1
            async with services.write_lock:
                await asyncio.to_thread(apply_interactions, services, deliveries)
            applied.append(time.monotonic())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(clicker())
    try:
        swapped = await hot_swap(services)
    finally:
        stop.set()
        await task
    return swapped, applied


def longest_gap(applied: list[float], start: float, end: float) -> float:
    """Longest time between two click batches applied in [start, end] (the window's ends count)."""
    marks = [start] + [t for t in applied if start <= t <= end] + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


def drift_replay(services, walks: list[tuple[int, list[int]]], rng: np.random.Generator,  # type: ignore[no-untyped-def]
                 *, shifted: bool) -> dict[str, float | bool]:
    """Reference window, then (optionally) move every user to category 0, then the current window.

    A user clicks a served item of their present category (prob. 0.5), at its position.
    """
    from core.events import ClickEvent, RecRequest
    from stream.kafka import Delivery
    from stream.recommend import recommend
    from stream.users import apply_interactions

    monitor = services.drift
    monitor.reset()
    preferred = {f"u{u}": category for u, (category, _) in enumerate(walks)}
    offsets = iter(range(10**9))

    def requests(count: int) -> None:
        clicks = []
        for n in range(count):
            user = f"u{int(rng.integers(len(walks)))}"
            response = recommend(services, RecRequest(request_id=f"d{n}", user_id=user, k=10), path="bench")
            for position, item in enumerate(response.items):
                if category_of(int(item.item_id[1:])) == preferred[user] and rng.random() < 0.5:
                    clicks.append(ClickEvent(event_id=f"dc{next(offsets)}", event_time=time.time(), user_id=user,
                                             item_id=item.item_id, action="click", position=position))
                    break
            if len(clicks) >= 50:
                apply_interactions(services, [Delivery(c, "drift", 0, next(offsets)) for c in clicks])
                clicks = []
        if clicks:
            apply_interactions(services, [Delivery(c, "drift", 0, next(offsets)) for c in clicks])

    reference_requests = monitor.reference_size // 10 + 1
    requests(reference_requests)
    if shifted:
        moved = user_walks(len(walks), 30, rng)
        events = []
        for u, (_, items) in enumerate(moved):
            preferred[f"u{u}"] = 0
            events += [ClickEvent(event_id=f"shift{u}-{k}", event_time=time.time(), user_id=f"u{u}",
                                  item_id=f"i{(item - 1) % PER_CATEGORY + 1}", action="click")
                       for k, item in enumerate(items)]
        for start in range(0, len(events), 500):
            apply_interactions(services, [Delivery(e, "shift", 0, next(offsets)) for e in events[start:start + 500]])
    requests(monitor.window_size // 10)
    results = monitor.results()
    return {**{k: v for k, v in asdict(results).items() if k != "alerts"}, "alerts": ",".join(results.alerts),
            "drift_detected": results.drift_detected}


def run(args, folder: Path) -> dict[str, object]:  # type: ignore[no-untyped-def]
    import torch
    from prometheus_client import CollectorRegistry

    from core.events import CatalogItem
    from exporter.metrics import Metrics
    from finetune.job import run_cycle
    from model.export.prepare import prepare_models
    from model.serving.registry import Registry
    from stream.broker import ensure_topics
    from stream.catalog import apply_catalog
    from stream.kafka import Delivery
    from stream.services import Services
    from stream.users import apply_interactions

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    base = load_settings()
    towers = prepare_models(base)
    broker = start_broker(folder / "logs")
    try:
        settings = stack_settings(base, broker, folder / "data", "finetune", model_dir=folder / "models",
                                  partitions=4, finetune_minutes=args.minutes, finetune_margin=args.margin,
                                  drift_reference_size=args.drift_window, drift_window_size=args.drift_window)
        asyncio.run(ensure_topics(settings))
        registry = Registry(settings.models_path)
        print("training the base version ...", flush=True)
        train_base(folder / "base", rng)
        registry.promote(registry.add(folder / "base", move=True))
        (settings.models_path / "towers").symlink_to(towers.resolve())

        services = Services.open(settings, CollectorRegistry())
        apply_catalog(services, [
            # Listed now: the ranker's recency feature stays in the range it was trained on.
            CatalogItem(event_id=f"cat{i}", event_time=time.time(), item_id=f"i{i}", title=f"item {i}",
                        category=f"c{category_of(i)}", price=float(i % 97))
            for i in range(1, N_ITEMS + 1)
        ])
        users = args.events // 50
        walks = user_walks(users, 50, rng)
        events = click_events(walks, T0, "new")[: args.events]
        for start in range(0, len(events), 2000):
            chunk = events[start:start + 2000]
            apply_interactions(services, [Delivery(e, "clicks", 0, start + n) for n, e in enumerate(chunk)])
        print(f"publishing {len(events)} clicks of {users} users ...", flush=True)
        asyncio.run(publish_all(settings, events))

        print("fine-tuning cycle ...", flush=True)
        metrics = Metrics(CollectorRegistry())
        began = time.monotonic()
        decision = run_cycle(settings, metrics)
        cycle_seconds = time.monotonic() - began
        promoted = decision.decision == "promoted"

        print("hot swap under load, clicks applied throughout ...", flush=True)
        applied: list[float] = []
        with RequestLoad(services, users) as load:
            time.sleep(1.0)
            swap_started = time.monotonic()
            swapped, applied = asyncio.run(swap_while_clicking(services, users, args.seed)) if promoted else (False, [])
            swap_ended = time.monotonic()
            time.sleep(1.0)
        during = [a for a in load.answered if swap_started <= a[0] <= swap_ended]
        gap = longest_gap(applied, swap_started, swap_ended)

        print("drift: stationary and shifted replays ...", flush=True)
        stationary = drift_replay(services, walks, rng, shifted=False)
        shifted = drift_replay(services, walks, rng, shifted=True)
        services.close()
    finally:
        broker.stop()
    return {
        "events": len(events),
        "cycle_seconds": round(cycle_seconds, 2),
        "promoted": promoted,
        "decision_reason": decision.reason,
        "candidate_ndcg@10": decision.candidate_metrics.get("ndcg@10"),
        "serving_ndcg@10": decision.serving_metrics.get("ndcg@10"),
        "train_steps": decision.training.get("steps"),
        "cycle_timings": decision.timings,
        "swapped": swapped,
        "swap_seconds": round(swap_ended - swap_started, 2),
        "swap_requests": len(during),
        "swap_click_batches": len([t for t in applied if swap_started <= t <= swap_ended]),
        "swap_longest_click_gap_seconds": round(gap, 3),
        "swap_failed_requests": len(load.failed),  # the whole load period, not only the swap window
        "requests_total": len(load.answered),
        "versions_served": sorted({version for _, version in load.answered}),
        "drift_stationary": stationary,
        "drift_shifted": shifted,
        "drift_alert_stationary": bool(stationary["drift_detected"]),
        "drift_alert_shifted": bool(shifted["drift_detected"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("finetune", __doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="new clicks for the fine-tuning cycle")
    parser.add_argument("--minutes", type=float, default=0.33, help="training budget of the cycle")
    parser.add_argument("--margin", type=float, default=0.02,
                        help="STREAMREC_FINETUNE_MARGIN of the cycle: the bench measures the swap, so a candidate "
                             "within this NDCG@10 of the serving model is promoted")
    parser.add_argument("--drift-window", type=int, default=3000, help="scores per drift window (10 per request)")
    args = parser.parse_args(argv)
    with work_dir(args.work_dir, "finetune") as folder:
        result = run(args, folder)
    report("fine-tuning, hot swap and drift", result)
    return 0
