"""CPU against CUDA onnxruntime for the served networks: scoring and image embedding.

Runs each exported network on the CPU execution provider (one intra-op
thread, as a worker serves, and all cores) and on CUDA, with numpy inputs and
outputs, so host-device copies are counted as serving pays them. Prints a
table and, as its last line, one JSON object with the median milliseconds and
the CPU/CUDA ratios. On a machine without a usable CUDA provider it prints
"no CUDA provider" and exits 0.

    python infra/gpu_check.py --models .streamrec/models
    python infra/gpu_check.py --models /tmp/srmodels --repeats 50

Networks: the served rule scorer (``rule/ranker.onnx``) and, when torch is
installed, the trained ranker's architecture exported with random weights
(cost does not depend on their values), for 500 candidates; the image tower
(``towers/image``) for 1, 8 and 32 photos.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Run from a checkout (python infra/gpu_check.py): the repository's packages are importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
CANDIDATES = 500
IMAGE_BATCHES = (1, 8, 32)


def session(path: Path, provider: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = [provider, CPU] if provider == CUDA else [CPU]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def cuda_problem(probe: Path) -> str | None:
    """None when a CUDA session really runs; else why not."""
    try:
        made = session(probe, CUDA, 1)
    except Exception as exc:  # a GPU build without a usable GPU fails here
        return f"{type(exc).__name__}: {exc}"
    if made.get_providers()[0] != CUDA:
        return f"the session fell back to {made.get_providers()}"
    return None


def median_ms(run: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up: CUDA allocates and tunes on the first runs
        run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return 1e3 * float(np.median(timings))


def random_feed(model: ort.InferenceSession, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the model's declared shapes, with every dynamic axis set to ``rows``."""
    feed = {}
    for spec in model.get_inputs():
        shape = [dim if isinstance(dim, int) else rows for dim in spec.shape]
        if "int64" in spec.type:
            feed[spec.name] = rng.integers(0, 2, shape).astype(np.int64)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def compare(path: Path, feed_rows: int, repeats: int, rng: np.random.Generator) -> dict[str, float]:
    one_thread, all_threads, cuda = (session(path, CPU, 1), session(path, CPU, os.cpu_count() or 1),
                                     session(path, CUDA, 1))
    feed = random_feed(one_thread, feed_rows, rng)
    row = {
        "cpu_1_thread_ms": median_ms(lambda: one_thread.run(None, feed), repeats),
        "cpu_all_threads_ms": median_ms(lambda: all_threads.run(None, feed), repeats),
        "cuda_ms": median_ms(lambda: cuda.run(None, feed), repeats),
    }
    row["ratio_cpu_1_thread_to_cuda"] = row["cpu_1_thread_ms"] / row["cuda_ms"]
    row["ratio_cpu_all_threads_to_cuda"] = row["cpu_all_threads_ms"] / row["cuda_ms"]
    row["max_abs_diff"] = float(np.abs(one_thread.run(None, feed)[0] - cuda.run(None, feed)[0]).max())
    return row


def ranker_onnx(folder: Path) -> Path | None:
    """The trained ranker's architecture exported with random weights; None without torch."""
    try:
        from model.export.fused import Networks, export_network
        from model.nets.towers import TowerConfig
    except ImportError:
        return None
    networks = Networks.build(TowerConfig(n_items=1000, n_attributes=100, max_attributes=8))
    networks.ranker.eval()
    path = folder / "ranker.onnx"
    export_network(networks, "ranker", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path(".streamrec/models"),
                        help="model folder with rule/ranker.onnx and towers/image (STREAMREC_MODEL_DIR)")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    if CUDA not in ort.get_available_providers():
        print(f"no CUDA provider (onnxruntime {ort.__version__} offers {ort.get_available_providers()})")
        return 0
    rule = args.models / "rule" / "ranker.onnx"
    image_meta = args.models / "towers" / "image" / "image_tower.json"
    if not rule.exists() or not image_meta.exists():
        print(f"missing {rule} or {image_meta}: run `streamrec setup` with STREAMREC_MODEL_DIR={args.models}")
        return 2
    problem = cuda_problem(rule)
    if problem is not None:
        print(f"no CUDA provider ({problem})")
        return 0
    image = image_meta.parent / json.loads(image_meta.read_text())["onnx_file"]
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        results[f"rule_scorer_{CANDIDATES}"] = compare(rule, CANDIDATES, args.repeats, rng)
        ranker = ranker_onnx(Path(folder))
        if ranker is not None:
            results[f"ranker_{CANDIDATES}"] = compare(ranker, CANDIDATES, args.repeats, rng)
        for batch in IMAGE_BATCHES:
            results[f"image_tower_{batch}"] = compare(image, batch, max(5, args.repeats // batch), rng)
    print(f"{'network':<18} {'cpu 1 thr ms':>12} {'cpu all ms':>11} {'cuda ms':>9} {'1 thr/cuda':>10} {'all/cuda':>9}")
    for name, row in results.items():
        print(f"{name:<18} {row['cpu_1_thread_ms']:>12.3f} {row['cpu_all_threads_ms']:>11.3f} {row['cuda_ms']:>9.3f}"
              f" {row['ratio_cpu_1_thread_to_cuda']:>10.2f} {row['ratio_cpu_all_threads_to_cuda']:>9.2f}")
    print(json.dumps({"cuda": True, "onnxruntime": ort.__version__, **{
        name: {key: round(value, 4) for key, value in row.items()} for name, row in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
