"""``streamrec bench scale``: a large catalogue: upsert rate, index build, worker memory, request latency.

``--items`` synthetic items (clustered unit vectors of the served model's
retrieval width, 384-d for the rule model; ``fused`` only) are
written through ``VectorStore.upsert`` with their vectors given, in batches of
1,000, then indexed with HNSW (``optimize``), both in this process before the
worker starts (the embedded store has one owner at a time). Users get a
history by publishing their clicks to the worker. The worker then serves closed-loop
HTTP clients; afterwards its resident memory (VmRSS) is read from /proc, per
process with ``--processes N`` (each holds the whole catalogue).
Recall@100 of the ANN search against exact search is checked on a few users.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench.common import (
    add_processes_option,
    bench_parser,
    percentiles,
    process_settings,
    report,
    run_on_one_stack,
)
from bench.serve import (
    ann_recall,
    http_load,
    latency_summary,
    prepare,
    user_vectors_sample,
)
from core.settings import Settings


def resident_mb(pid: int) -> float:
    """VmRSS of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("scale", __doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--clicks-per-user", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--recall-queries", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=4)
    add_processes_option(parser)
    args = parser.parse_args(argv)
    result, _ = run_on_one_stack(args, "scale", run)
    report(f"scale: {args.items} items, {args.users} users, {args.clients} concurrent HTTP clients", result)
    return 0


def run(args: argparse.Namespace, settings: Settings, folder: Path) -> dict[str, object]:
    prepared = prepare(args, settings, folder)
    worker, seeded = prepared.worker, prepared.seeded
    try:
        rss_ready = [resident_mb(pid) for _, pid in sorted(worker.pids().items())]
        print("HTTP load ...", flush=True)
        server_ms: list[float] = []
        http = asyncio.run(http_load(settings, prepared.user_ids, clients=args.clients, requests=args.requests,
                                     seed=args.seed, server_ms=server_ms))
        rss = [resident_mb(pid) for _, pid in sorted(worker.pids().items())]
    finally:
        worker.stop()
    _, user_vectors = user_vectors_sample(settings, args.users, args.seed, args.processes)
    recall = ann_recall(process_settings(settings, args.processes)[0], user_vectors[:args.recall_queries])
    print(f"  recall@100 {recall['recall']:.3f}", flush=True)
    latency = latency_summary("http", http)
    return {
        "upsert_per_s": round(seeded.items / seeded.upsert_seconds, 1),
        "index_seconds": round(seeded.index_seconds, 1),
        "rss_mb": round(max(rss), 1),
        "p99_ms": latency["http_p99_ms"],
        "p50_ms": latency["http_p50_ms"],
        "p999_ms": latency["http_p999_ms"],
        "server_p99_ms": round(percentiles(server_ms, (99,))["p99"], 3),
        "rss_ready_mb": round(max(rss_ready), 1),
        "rss_mb_per_process": [round(value, 1) for value in rss],
        "rss_mb_total": round(sum(rss), 1),
        "processes": args.processes,
        "recall_at_100": round(recall["recall"], 4),
        "ann_search_p99_ms": round(recall["ann_p99_ms"], 3),
        "upsert_per_cpu_s": round(seeded.items / seeded.upsert_cpu_seconds, 1),
        "index_cpu_seconds": round(seeded.index_cpu_seconds, 1),
        "items": seeded.items,
        "users": len(prepared.user_ids),
        "clients": args.clients,
        "requests": len(http),
    }


if __name__ == "__main__":
    sys.exit(main())
