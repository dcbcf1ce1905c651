"""Benchmarks, the demo and the local stack: tooling beside the product, never imported by it.

``streamrec bench NAME [args]`` runs ``main(args)`` of the module ``BENCHMARKS[NAME]``
names. Each benchmark prints a table and, as its last line, one JSON object.
The other modules are their shared parts: ``common`` (worker and broker
set-up, timing), ``stack`` (the local broker and worker processes), ``demo``,
``movielens`` (the MovieLens files as events), ``fuzzcases`` and
``prequential_eval`` (the replay's pure parts).
"""

BENCHMARKS: dict[str, str] = {
    "broker": "broker",
    "crash": "crash",
    "encode": "encode",
    "finetune": "finetune",
    "freshness": "freshness",
    "fuzz": "fuzz",
    "ingest": "ingest",
    "load": "load",
    "prequential": "prequential",
    "processes": "processes",
    "quality": "quality",
    "scale": "scale",
    "serve": "serve",
    "signals": "signals",
    "sweep": "sweep",
}
