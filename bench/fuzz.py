"""``streamrec bench fuzz``: malformed events on every topic between good ones; nothing may crash.

Sends ``--cases`` malformed messages from ``bench.fuzzcases`` (bad UTF-8 and
JSON, wrong types, missing and unknown fields, unknown schema versions,
negative and huge numbers, 10 MB payloads, null tombstones, truncated images,
decompression bombs, image URIs outside the allowed root: traversal, symlink
escape, remote schemes), each followed by a good click. Every malformed message
must reach the dead-letter topic with one of its expected reasons, every good
click must be applied, and the worker process must never exit (it runs under a
supervisor that restarts it and counts the restarts).
"""
from __future__ import annotations

import asyncio
import io
import os
import time
from collections import Counter
from pathlib import Path

from bench import movielens
from bench.common import (
    Landed,
    RecordingPublisher,
    Supervisor,
    TopicFollower,
    bench_parser,
    report,
    stack_settings,
    start_broker,
    user_state,
    wait_for,
    work_dir,
)
from bench.fuzzcases import FuzzLimits, generate_cases
from core.events import ClickEvent, DeadLetter
from core.settings import Settings, load_settings

CATALOGUE_ITEMS = 40
SETTLE_EVERY_CASES = 25
DRAIN_TIMEOUT_S = 900.0


def prepare_image_root(folder: Path) -> tuple[Path, str]:
    """An image root with one real photo, and a symlink in it that points outside it."""
    from PIL import Image

    root = folder / "images"
    root.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="JPEG")
    (root / "photo.jpg").write_bytes(buffer.getvalue())
    outside = folder / "outside.jpg"
    outside.write_bytes(buffer.getvalue())
    link = root / "escape.jpg"
    if not link.is_symlink():
        os.symlink(outside, link)
    return root, link.name


class FuzzRun:
    """Publishes cases and good clicks and keeps what is needed to judge the outcome."""

    def __init__(self, settings: Settings, supervisor: Supervisor, limits: FuzzLimits, *, cases: int,
                 good_users: int, seed: int) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.limits = limits
        self.case_count = cases
        self.good_users = [f"good-user-{n}" for n in range(good_users)]
        self.seed = seed
        self.reasons: dict[int, frozenset[str]] = {}
        self.kinds: dict[int, str] = {}
        self.positions: list[Landed] = []
        self.refused: list[tuple[object, str]] = []
        self.good_sent = 0
        self.full_size_payloads = 0  # cases of limits.oversize_bytes (10 MB by default)

    async def publish(self) -> None:
        catalogue = movielens.catalog_events()[:CATALOGUE_ITEMS]
        item_ids = [item.item_id for item in catalogue]
        async with RecordingPublisher(self.settings, keep_positions=True) as publisher:
            for item in catalogue:
                await publisher.publish(item, tag=("catalog", item.item_id))
            cases = generate_cases(self.case_count, seed=self.seed, limits=self.limits)
            for n, case in enumerate(cases):
                self.reasons[n], self.kinds[n] = case.reasons, case.kind
                self.full_size_payloads += len(case.value or b"") >= self.limits.oversize_bytes
                good = ClickEvent(event_id=f"fuzz-good-{self.seed}-{n}", event_time=time.time(),
                                  user_id=self.good_users[n % len(self.good_users)],
                                  item_id=item_ids[n % len(item_ids)])
                await publisher.publish(good, tag=("good", n))
                await publisher.publish_raw(self.settings.topic(case.topic_key), case.value, case.key,
                                            tag=("case", n))
                if n % SETTLE_EVERY_CASES == SETTLE_EVERY_CASES - 1:
                    await publisher.settle()
                    await asyncio.to_thread(self.supervisor.check)
            await publisher.settle()
            assert publisher.positions is not None
            self.positions = publisher.positions
            self.refused = publisher.refused
        self.good_sent = sum(1 for p in self.positions if isinstance(p.tag, tuple) and p.tag[0] == "good")

    def good_applied(self) -> int:
        total = 0
        for user_id in self.good_users:
            state = user_state(self.settings, user_id)
            total += int(state.get("applied_count", 0)) if state else 0
        return total

    def judge(self, letters: list[DeadLetter]) -> dict[str, object]:
        case_at = {(p.topic, p.partition, p.offset): p.tag[1] for p in self.positions  # type: ignore[index]
                   if isinstance(p.tag, tuple) and p.tag[0] == "case"}
        lettered: Counter[int] = Counter()
        wrong_reason: Counter[str] = Counter()
        unexpected = 0
        reasons: Counter[str] = Counter()
        for letter in letters:
            n = case_at.get((letter.source_topic, letter.partition, letter.offset))
            if n is None:
                unexpected += 1  # a good event or a catalogue item was dead-lettered
                continue
            lettered[n] += 1
            reasons[letter.reason] += 1
            if letter.reason not in self.reasons[n]:
                wrong_reason[f"{self.kinds[n]}:{letter.reason}"] += 1
        missing = Counter(self.kinds[n] for n in case_at.values() if n not in lettered)
        return {
            "dead_lettered": len(lettered),
            "dead_letter_duplicates": sum(lettered.values()) - len(lettered),
            "wrong_reason": sum(wrong_reason.values()),
            "wrong_reason_by_kind": dict(wrong_reason),
            "not_dead_lettered_by_kind": dict(missing),
            "unexpected_dead_letters": unexpected,
            "reasons": dict(sorted(reasons.items())),
        }


def _send_and_collect(run: FuzzRun, supervisor: Supervisor) -> tuple[list[DeadLetter], int]:
    """Publish everything, then wait for the dead letters and the good clicks to arrive."""
    settings = run.settings
    with TopicFollower(settings, settings.topic("deadletter")) as follower:
        print(f"sending {run.case_count} malformed messages, each after a good click ...", flush=True)
        asyncio.run(run.publish())
        expected_letters = run.case_count - len(run.refused)

        def drained() -> bool:
            supervisor.check()
            return len(follower.records()) >= expected_letters and run.good_applied() >= run.good_sent

        wait_for(drained, timeout_s=DRAIN_TIMEOUT_S, stall_s=90,
                 progress=lambda: len(follower.records()) + run.good_applied())
        supervisor.check()
        letters = [DeadLetter.model_validate_json(r.value) for r in follower.records()]
        return letters, run.good_applied()


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("fuzz", __doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--good-users", type=int, default=20)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    base = load_settings()
    with work_dir(args.work_dir, "fuzz") as folder:
        image_root, escape_link = prepare_image_root(folder)
        broker = start_broker(folder / "logs")
        try:
            settings = stack_settings(base, broker, folder / "fuzz", "fuzz", image_root=image_root,
                                      image_allow_http=False)
            limits = FuzzLimits(max_event_bytes=settings.max_event_bytes,
                                max_image_pixels=settings.max_image_pixels,
                                image_root=image_root, escape_link=escape_link)
            supervisor = Supervisor(settings, folder / "logs" / "worker.log")
            try:
                supervisor.start()
                run = FuzzRun(settings, supervisor, limits, cases=args.cases, good_users=args.good_users,
                              seed=args.seed)
                letters, good_applied = _send_and_collect(run, supervisor)
            finally:
                supervisor.stop()
        finally:
            broker.stop()
    outcome = run.judge(letters)
    result: dict[str, object] = {
        "cases": args.cases,
        "dead_lettered": outcome["dead_lettered"],
        "crashes": supervisor.restarts,
        "good_sent": run.good_sent,
        "good_applied": good_applied,
        "broker_refused": len(run.refused),
        "ten_megabyte_payloads": run.full_size_payloads,
        "wrong_reason": outcome["wrong_reason"],
        "unexpected_dead_letters": outcome["unexpected_dead_letters"],
        "dead_letter_duplicates": outcome["dead_letter_duplicates"],
        "not_dead_lettered_by_kind": outcome["not_dead_lettered_by_kind"],
        "wrong_reason_by_kind": outcome["wrong_reason_by_kind"],
        "refused_examples": sorted({error[:160] for _, error in run.refused})[:3],
        "reasons": outcome["reasons"],
        "exit_codes": supervisor.exit_codes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    report("fuzz: malformed events between good ones", result)
    ok = (result["dead_lettered"] == args.cases and result["crashes"] == 0
          and result["good_applied"] == result["good_sent"] and result["wrong_reason"] == 0)
    return 0 if ok else 1
