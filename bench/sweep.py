"""``streamrec bench sweep``: the retrieval towers trained under several settings, side by side.

    streamrec bench sweep --data FILE [--format s3rec] --variant NAME:KEY=VALUE[,KEY=VALUE...] ...
                          [--seeds 42,1,2] [--workers N] [--device auto|cpu|cuda] [--jsonl FILE]

Each variant overrides fields of the format's defaults (``TowerConfig`` fields such as
``fused_dim``, or ``RetrievalSettings`` fields such as ``negatives`` or
``fine_tune_epochs``); ``defaults`` (no override) always runs first. Every run trains
the towers on items[:-2] with early stopping on items[-2], then fine-tunes them on
items[:-1] as ``streamrec train`` does, and reports full-ranking HR@10 / NDCG@10 on the
validation step and on the test step before and after that fine-tuning. The towers
alone are measured (no ranker, no co-visits): the comparison is between settings.
Runs go to ``--workers`` processes at once (on a GPU they share it); each result is
printed, and appended to ``--jsonl``, as it finishes; the last line is one JSON object
with every run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from core.errors import ConfigError, StreamrecError

TOWER_KEYS = ("fused_dim", "max_sequence", "n_layers", "n_heads", "ffn_multiplier", "dropout", "attention_dropout")


@dataclass(frozen=True)
class Variant:
    name: str
    tower: dict[str, Any]
    retrieval: dict[str, Any]


def parse_variant(text: str) -> Variant:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> a Variant; an unknown key or a bad value names itself."""
    from model.training.retrieval import RetrievalSettings

    name, _, assignments = text.partition(":")
    if not name or not assignments:
        raise ConfigError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    kinds = {field.name: type(field.default) for field in fields(RetrievalSettings)}
    tower: dict[str, Any] = {}
    retrieval: dict[str, Any] = {}
    for assignment in assignments.split(","):
        key, _, value = assignment.partition("=")
        key = key.strip()
        if key in TOWER_KEYS:
            target, kind = tower, float if key.endswith("dropout") else int
        elif key in kinds and key not in ("seed", "train_action"):
            target, kind = retrieval, kinds[key]
        else:
            known = ", ".join(sorted((*TOWER_KEYS, *(k for k in kinds if k not in ("seed", "train_action")))))
            raise ConfigError(f"--variant {name}: unknown setting {key!r}; known: {known}")
        try:
            target[key] = kind(value)
        except ValueError:
            raise ConfigError(f"--variant {name}: {key}={value!r} is not a {kind.__name__}") from None
    return Variant(name, tower, retrieval)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and measure one (variant, seed); runs in a worker process."""
    import torch

    from model.nets.towers import attribute_mixing
    from model.serving.contract import ACTION_CODE
    from model.serving.networks import TowerConfig
    from model.training.data import leave_one_out, load_interactions
    from model.training.retrieval import (
        Catalogue,
        fine_tune_on_newest_step,
        full_ranking_metrics,
        train_retrieval,
    )
    from model.training.train import FORMAT_ACTION, FORMAT_RETRIEVAL, FORMAT_TOWER

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    started = time.monotonic()
    data = load_interactions(job["format"], Path(job["data"]))
    split = leave_one_out(data)
    attributes = torch.from_numpy(data.attributes)
    catalogue = Catalogue(attributes=attributes, attribute_mixing=attribute_mixing(attributes, data.n_attributes))
    config = TowerConfig(n_items=data.n_items, n_attributes=data.n_attributes,
                         max_attributes=data.attributes.shape[1],
                         **{**FORMAT_TOWER[job["format"]], **job["tower"]})
    settings = replace(FORMAT_RETRIEVAL[job["format"]], seed=job["seed"], minutes=job["minutes"],
                       train_action=ACTION_CODE[data.action or FORMAT_ACTION[job["format"]]], **job["retrieval"])
    model, report = train_retrieval(config, settings, split, catalogue, progress=False, device=job["device"])

    def test() -> dict[str, float]:
        return full_ranking_metrics(model, catalogue, split.inputs("test"), split.test, config.max_sequence,
                                    settings.train_action)

    before = test()
    fine_tune = fine_tune_on_newest_step(model, settings, split, catalogue, False, job["device"])
    after = test()
    return {
        "variant": job["variant"], "seed": job["seed"], "data": data.name, "device": job["device"],
        "tower": job["tower"], "retrieval": job["retrieval"],
        "best_epoch": report.best_epoch, "epochs_run": report.epochs_run,
        "train_seconds": round(report.seconds, 1), "seconds": round(time.monotonic() - started, 1),
        "seconds_per_epoch": round(report.seconds / max(report.epochs_run, 1), 1),  # validation passes included
        "valid": report.validation, "test_before_fine_tune": before, "test": after, "fine_tune": fine_tune,
    }


def summary_line(result: dict[str, Any]) -> str:
    valid, before, after = result["valid"], result["test_before_fine_tune"], result["test"]
    return (f"{result['variant']:<24}{result['seed']:>5}{result['best_epoch']:>5}/{result['epochs_run']:<4}"
            f"{valid.get('hr@10', 0):>9.4f}{valid.get('ndcg@10', 0):>9.4f}"
            f"{before['hr@10']:>9.4f}{before['ndcg@10']:>9.4f}{after['hr@10']:>9.4f}{after['ndcg@10']:>9.4f}"
            f"{result['fine_tune']['epochs']:>4}{result['train_seconds']:>8.0f}")


HEADER = (f"{'variant':<24}{'seed':>5}{'best/run':>9}{'val HR':>9}{'val NDCG':>9}{'pre HR':>9}{'pre NDCG':>9}"
          f"{'test HR':>9}{'NDCG':>9}{'ft':>4}{'train s':>8}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec bench sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="interaction file")
    parser.add_argument("--format", default="s3rec", choices=("s3rec",),
                        help="interaction format (the towers alone: formats with a catalogue use bench quality)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                        help="a setting to compare (repeat the option); 'defaults' always runs")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds, each variant runs once per seed")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--minutes", type=float, default=28.0, help="wall-clock budget of each run's training")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--jsonl", type=Path, default=None, help="append each finished run here")
    return parser


def main(argv: list[str] | None = None) -> int:
    from model.training.train import training_device

    args = build_parser().parse_args(argv)
    try:
        variants = [Variant("defaults", {}, {}), *(parse_variant(text) for text in args.variant)]
        seeds = [int(seed) for seed in args.seeds.split(",")]
        device = training_device(args.device)
        if not args.data.is_file():
            raise ConfigError(f"--data {args.data}: no such file")
    except (StreamrecError, ValueError) as error:
        print(f"streamrec bench sweep: {error}", file=sys.stderr)
        return 2
    jobs = [{"variant": v.name, "tower": v.tower, "retrieval": v.retrieval, "seed": seed, "format": args.format,
             "data": str(args.data), "device": device, "threads": args.threads, "minutes": args.minutes}
            for v in variants for seed in seeds]
    print(HEADER, flush=True)
    results: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(max(1, args.workers), maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(run_one, jobs):
            results.append(result)
            print(summary_line(result), flush=True)
            if args.jsonl is not None:
                with args.jsonl.open("a") as sink:
                    sink.write(json.dumps(result) + "\n")
    order = {(job["variant"], job["seed"]): i for i, job in enumerate(jobs)}
    results.sort(key=lambda result: order[(result["variant"], result["seed"])])
    print(json.dumps({"benchmark": "sweep", "data": str(args.data), "device": device,
                      "variants": [asdict(v) for v in variants], "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
