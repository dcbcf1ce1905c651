"""Benchmarks: ``streamrec bench NAME [args]`` runs ``stream.bench.NAME.main(args)``.

Each benchmark prints a table and, as its last line, one JSON object.
"""
