"""``streamrec`` command line: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time

from stream.errors import ConfigError, StreamrecError
from stream.settings import Settings, load_settings


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
    from stream.worker import run_worker

    sys.argv = [sys.argv[0], "worker"]  # faust's Worker reads argv
    run_worker(settings, loglevel=args.loglevel)
    return 0


def _cmd_setup(settings: Settings, args: argparse.Namespace) -> int:
    from stream.services import load_serving_model, prepare_towers

    towers = prepare_towers(settings, check=True)
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
    from stream.demo import run_demo

    return run_demo(settings, users=args.users, events=args.events)


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.status import main as status_main

    return status_main(args.rest)


def _cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from model.train import main as train_main

    return train_main(args.rest)


def _benchmarks() -> dict[str, str]:
    import pkgutil

    import stream.bench

    found = {m.name: f"stream.bench.{m.name}" for m in pkgutil.iter_modules(stream.bench.__path__)}
    return {"quality": "model.quality_bench", **found}


def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    import importlib

    benchmarks = _benchmarks()
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
    sub.add_parser("setup", help="export the content towers to ONNX and prepare the serving model")

    rec = sub.add_parser("recommend", help="ask a running worker for a user's recommendations")
    rec.add_argument("user")
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--query")
    rec.add_argument("--http", action="store_true", help="use the HTTP endpoint instead of Kafka")
    rec.add_argument("--timeout", type=float, default=10.0)

    demo = sub.add_parser("demo", help="replay MovieLens-100k through the embedded stack")
    demo.add_argument("--users", type=int, default=300, help="users to replay")
    demo.add_argument("--events", type=int, default=20000, help="click events to replay at most")

    status = sub.add_parser("status", help="one-screen summary of a running worker (see streamrec status -h)",
                            add_help=False)
    status.add_argument("rest", nargs=argparse.REMAINDER)
    train = sub.add_parser("train", help="train the fused model (see streamrec train -h)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    bench = sub.add_parser("bench", help="benchmarks (streamrec bench NAME -h): quality, ingest, crash, ...")
    bench.add_argument("benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
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
}


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
