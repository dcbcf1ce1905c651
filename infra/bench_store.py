"""Benchmark of the embedded (qdrant-edge) vector store.

Prints upserts per second, the HNSW build time of ``optimize``, and for a few
``hnsw_ef`` values the p50/p99 latency of a top-k search and its recall@k
against exact (numpy brute-force) neighbours. Random Gaussian vectors are a
hard case for HNSW; real embeddings cluster and recall is usually higher.

    python infra/bench_store.py                  # 20k x 64-d, ef 64/128/256/512
    python infra/bench_store.py --points 5000 --ef 128 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from stream.store import CollectionSpec, Point
from stream.store.edge import EdgeStore

CATEGORIES = ("toys", "sports", "books", "garden", "kitchen")


def make_points(rng: np.random.Generator, count: int, dim: int) -> tuple[list[Point], np.ndarray]:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)  # (count, dim)
    points = [
        Point(
            id=f"item-{i}",
            vectors={"fused": vectors[i]},
            payload={
                "category": CATEGORIES[i % len(CATEGORIES)],
                "price": float(rng.uniform(1, 200)),
                "title": f"item number {i}",
            },
        )
        for i in range(count)
    ]
    return points, vectors


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> list[set[str]]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = queries @ unit.T  # (Q, count); query norms do not change the order
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return [{f"item-{i}" for i in row} for row in top]


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000, help="points per upsert call")
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256, 512])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    points, vectors = make_points(rng, args.points, args.dim)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    truth = exact_neighbours(vectors, queries, args.k)
    spec = CollectionSpec("items", {"fused": args.dim})

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        data_dir = Path(tmp)
        # Low thresholds force an HNSW graph even on a small collection, so
        # the ANN path is what gets measured (engine defaults would scan).
        options = {"indexing_threshold_kb": 1000, "full_scan_threshold_kb": 10}
        with EdgeStore(data_dir, **options) as store:
            store.ensure_collection(spec)
            start = time.perf_counter()
            for begin in range(0, len(points), args.batch):
                store.upsert(spec.name, points[begin : begin + args.batch])
            upsert_s = time.perf_counter() - start
            start = time.perf_counter()
            store.optimize(spec.name)
            optimize_s = time.perf_counter() - start
            indexed = store.indexed_vector_count(spec.name)
            exact_latency = []
            for query in queries:
                start = time.perf_counter()
                store.search(spec.name, "fused", query, args.k, exact=True)
                exact_latency.append(time.perf_counter() - start)

        print(f"points {args.points} x {args.dim}-d, payload of 3 keys, batches of {args.batch}")
        print(f"upsert: {args.points / upsert_s:,.0f} points/s ({upsert_s:.2f} s)")
        print(f"optimize (HNSW build): {optimize_s:.2f} s, {indexed} vectors indexed")
        print(
            f"exact top-{args.k}: p50 {percentile_ms(exact_latency, 50):.2f} ms, "
            f"p99 {percentile_ms(exact_latency, 99):.2f} ms"
        )
        for ef in args.ef:
            with EdgeStore(data_dir, hnsw_ef=ef, **options) as store:
                store.ensure_collection(spec)
                latency, recall = [], []
                for query, expected in zip(queries, truth):
                    start = time.perf_counter()
                    hits = store.search(spec.name, "fused", query, args.k)
                    latency.append(time.perf_counter() - start)
                    recall.append(len({hit.id for hit in hits} & expected) / args.k)
            print(
                f"hnsw_ef {ef:4d}: top-{args.k} p50 {percentile_ms(latency, 50):.2f} ms, "
                f"p99 {percentile_ms(latency, 99):.2f} ms, recall@{args.k} {np.mean(recall):.3f}"
            )


if __name__ == "__main__":
    main()
