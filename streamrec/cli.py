"""``streamrec`` command line: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time

from core.errors import ConfigError, StreamrecError
from core.settings import Settings, load_settings


def _cmd_broker(settings: Settings, args: argparse.Namespace) -> int:
    from stream.broker import EmbeddedBroker, ensure_topics

    port = int(settings.bootstrap_list[0].rpartition(":")[2])
    broker = EmbeddedBroker(port).start()
    created = asyncio.run(ensure_topics(settings))
    print(f"embedded broker on {broker.bootstrap}; topics created: {', '.join(created) or 'none (existed)'}",
          flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"] and broker.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def _cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from stream.worker import default_processes, run_worker

    processes = args.processes if args.processes is not None else default_processes()
    if args.process_index is None:  # a supervised process finds them exported by its supervisor
        from model.export.prepare import prepare_models

        prepare_models(settings)  # exported once; a worker itself never loads torch
    sys.argv = [sys.argv[0], "worker"]  # faust's Worker reads argv
    run_worker(settings, loglevel=args.loglevel, processes=processes, process_index=args.process_index)
    return 0


def _cmd_setup(settings: Settings, args: argparse.Namespace) -> int:
    from model.export.prepare import prepare_models
    from stream.services import load_serving_model

    towers = prepare_models(settings, check=True)
    model = load_serving_model(settings)
    print(f"towers ready in {towers}; serving model {model.version}")
    return 0


def _cmd_recommend(settings: Settings, args: argparse.Namespace) -> int:
    from stream.client import request_recommendations

    response = asyncio.run(
        request_recommendations(settings, args.user, k=args.k, query=args.query,
                                timeout_s=args.timeout, via_http=args.http)
    )
    print(json.dumps(response.model_dump(), indent=2))
    return 0


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.demo import run_demo

    return run_demo(settings, users=args.users, events=args.events,
                    posters=Path(args.posters) if args.posters else None)


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.status import main as status_main

    return status_main(args.rest)


def _cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from model.training.train import main as train_main

    return train_main(args.rest)


def _cmd_finetune(settings: Settings, args: argparse.Namespace) -> int:
    from finetune.job import main as finetune_main

    argv = (["--every", args.every] if args.every else []) + (["--no-drain"] if args.no_drain else [])
    return finetune_main(settings, argv)


def _cmd_model(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.serving.registry import Registry

    registry = Registry(settings.models_path)
    if args.action == "list":
        for info in registry.versions():
            heldout = info.metrics.get("heldout") or info.metrics.get("test_full") or {}
            ndcg = heldout.get("ndcg@10")
            print(f"{'*' if info.current else ' '} {info.version}  parent={info.parent or '-'}  "
                  f"created={info.created_at}  ndcg@10={'-' if ndcg is None else f'{ndcg:.4f}'}")
        return 0
    if args.action == "promote":
        if not args.version:
            raise ConfigError("streamrec model promote needs VERSION (a registered version or an artefact folder)")
        version = args.version
        if Path(version).is_dir():  # an artefact built by `streamrec train --out DIR`
            version = registry.add(Path(version))
        registry.promote(version)
    else:
        version = registry.rollback()
    _announce(settings, version, registry.path(version))
    print(f"current model: {version}")
    return 0


def _announce(settings: Settings, version: str, path: object) -> None:
    """Tell running workers (best effort: they also check the registry when they start)."""
    from finetune.job import publish_update

    try:
        asyncio.run(asyncio.wait_for(publish_update(settings, version, path), 10))  # type: ignore[arg-type]
    except Exception as exc:  # the registry already changed; a worker restart picks it up
        print(f"streamrec: model.updates not published ({type(exc).__name__}: {exc})", file=sys.stderr)


def _cmd_schema(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from stream import contracts

    out = Path(args.out)
    if args.check:
        stale = contracts.stale(out)
        for relative in stale:
            print(f"streamrec schema: {out / relative} differs from what the code generates", file=sys.stderr)
        if stale:
            print("streamrec schema: run `streamrec schema` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for path in contracts.write(out):
        print(path)
    return 0


def _cmd_load_catalogue(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from core.errors import StoreInUseError
    from stream.catalog_file import DEFAULT_BATCH_SIZE, count_lines, load_catalogue
    from stream.services import Services

    path, batch_size = Path(args.file), args.batch_size or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    total = count_lines(path)
    try:
        services = Services.open(settings)
    except StoreInUseError as exc:
        raise StoreInUseError(f"{exc}: stop the worker on {settings.data_dir} before loading into its store") from exc
    try:
        with tqdm(total=total, unit="items", desc=path.name, disable=args.quiet) as bar:
            loaded = load_catalogue(services, path, batch_size=batch_size, progress=bar.update)
    finally:
        services.close()
    for bad in loaded.rejected[:args.show_errors]:
        print(f"streamrec load-catalogue: rejected {bad}", file=sys.stderr)
    if len(loaded.rejected) > args.show_errors:
        print(f"streamrec load-catalogue: ... and {len(loaded.rejected) - args.show_errors} more", file=sys.stderr)
    print(f"loaded {loaded.loaded} items, rejected {len(loaded.rejected)}, into {services.collections.items} "
          f"(model {services.model.version}): {loaded.load_seconds:.1f} s, {loaded.items_per_s:.0f} items/s; "
          f"index built in {loaded.index_seconds:.1f} s")
    return 1 if loaded.rejected else 0


def _benchmarks() -> dict[str, str]:
    from bench import BENCHMARKS

    return {name: f"bench.{module}" for name, module in BENCHMARKS.items()}


def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    import importlib

    benchmarks = _benchmarks()
    if args.benchmark is None:
        print("streamrec bench NAME [options]; NAME is one of: " + ", ".join(sorted(benchmarks)))
        return 0
    if args.benchmark not in benchmarks:
        raise ConfigError(f"unknown benchmark {args.benchmark!r}; choose one of: {', '.join(sorted(benchmarks))}")
    return int(importlib.import_module(benchmarks[args.benchmark]).main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec", description=__doc__)
    parser.add_argument("--log-level", default="warning", help="python log level")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("broker", help="run the embedded Kafka-protocol broker and create the topics")
    worker = sub.add_parser("worker", help="run a stream worker (agents + HTTP endpoint)")
    worker.add_argument("--loglevel", default="warning")
    worker.add_argument("--processes", type=int, default=None,
                        help="worker processes, each owning a share of the partitions (default: the CPU count)")
    worker.add_argument("--process-index", type=int, default=None, help=argparse.SUPPRESS)
    sub.add_parser("setup", help="export the content towers to ONNX and prepare the serving model")

    rec = sub.add_parser("recommend", help="ask a running worker for a user's recommendations")
    rec.add_argument("user")
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--query")
    rec.add_argument("--http", action="store_true", help="use the HTTP endpoint instead of Kafka")
    rec.add_argument("--timeout", type=float, default=10.0)

    demo = sub.add_parser("demo", help="the learning loop on MovieLens-100k, through the embedded stack")
    demo.add_argument("--users", type=int, default=943, help="the most active users to replay")
    demo.add_argument("--events", type=int, default=30000, help="ratings replayed before the fine-tuning cycle")
    demo.add_argument("--posters", metavar="DIR", default=None,
                      help="a MovieLens posters folder (items.json, posters/<id>.jpg): the films get their real "
                           "plots and posters, and a visual search is made with one")

    # Their own parsers take the options (parse_known_args below passes them through).
    sub.add_parser("status", help="one-screen summary of a running worker (see streamrec status -h)",
                   add_help=False)
    sub.add_parser("train", help="train the fused model (see streamrec train -h)", add_help=False)
    finetune = sub.add_parser("finetune", help="one fine-tuning cycle, or one every DURATION")
    finetune.add_argument("--every", help="run forever, one cycle per DURATION (e.g. 1h, 30m)")
    finetune.add_argument("--no-drain", action="store_true", help="train on the stored log only")
    model = sub.add_parser("model", help="the model registry: list, promote VERSION|DIR, rollback")
    model.add_argument("action", choices=("list", "promote", "rollback"))
    model.add_argument("version", nargs="?")
    schema = sub.add_parser("schema", help="write the contracts: JSON Schema per message, AsyncAPI, OpenAPI")
    schema.add_argument("--out", default="docs/schemas", help="folder to write them to (default docs/schemas)")
    schema.add_argument("--check", action="store_true", help="write nothing; exit 1 if the folder's copies differ")
    load = sub.add_parser("load-catalogue", help="bulk-load a JSON-lines catalogue file into the store "
                                                 "(the worker must be stopped)")
    load.add_argument("file", help="one catalogue item (the catalog.items schema) per line")
    load.add_argument("--batch-size", type=int, default=None, help="items per embedding and upsert step (1024)")
    load.add_argument("--show-errors", type=int, default=20, help="rejected lines to print at most")
    load.add_argument("--quiet", action="store_true", help="no progress bar")
    bench = sub.add_parser("bench", help="benchmarks (streamrec bench NAME -h): quality, ingest, crash, ...",
                           add_help=False)
    bench.add_argument("benchmark", nargs="?")
    return parser


COMMANDS = {
    "broker": _cmd_broker,
    "worker": _cmd_worker,
    "setup": _cmd_setup,
    "recommend": _cmd_recommend,
    "demo": _cmd_demo,
    "status": _cmd_status,
    "train": _cmd_train,
    "bench": _cmd_bench,
    "finetune": _cmd_finetune,
    "model": _cmd_model,
    "schema": _cmd_schema,
    "load-catalogue": _cmd_load_catalogue,
}


PASSTHROUGH = frozenset({"train", "bench", "status"})


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # train, bench and status hand their own arguments (options included) to
    # the job's parser; every other command takes only what it declares.
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so child processes (broker, worker) are stopped too.
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except ConfigError as exc:
        print(f"streamrec: configuration error: {exc}", file=sys.stderr)
        return 2
    except StreamrecError as exc:
        print(f"streamrec: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
