"""Embedded backend: Qdrant's engine in-process through ``qdrant_edge``.

One ``EdgeShard`` per collection, in ``data_dir/<collection>/``, with its
write-ahead log on, so an upsert that returned survives a crash of the process
(flush() is only needed to shrink the log). A shard directory can be open in
one process at a time: the log is locked, and a second opener gets
``StoreInUseError`` (a ``StoreUnavailableError``).

Concurrency, measured: three threads searching with filters while a fourth
upserted and ran ``optimize`` gave no errors and exact counts, so searches are
not serialised behind a lock here. ``optimize`` holds the GIL for the whole
index build (about 2 s for 5k and 13-45 s for 20k 64-d points on two shared
cores), so it blocks an asyncio loop in the same process however it is called:
run it at start-up, after a bulk load, or in a separate maintenance process.

Payloads are stored packed: the keys the engine filters or looks up on (id,
category, price) as values, every other key in one JSON text. Measured with
qdrant-edge 0.9, handing a payload to the engine (and back) costs about 1.7 µs
of CPU per list element or dict entry: a user's state (50 sequence entries, 256
recent event ids) took ~1.9 ms per point, against ~0.07 ms packed. Payloads
written unpacked (before this format) are read as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydantic_core
import qdrant_edge as qe

from core.errors import ConfigError, StoreInUseError, StoreUnavailableError
from stream.store.base import (
    CATEGORY_KEY,
    ID_KEY,
    PRICE_KEY,
    CollectionSpec,
    Hit,
    Point,
    SearchFilter,
    VectorStore,
    WithVectors,
    check_distinct_points,
    check_limit,
    check_payload,
    check_price_bounds,
    check_quantization,
    check_query_matrix,
    check_same_spec,
    check_vector,
    int8_vectors,
    named_vectors,
    point_id,
    stored_payload,
    to_hit,
    wanted_vectors,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCROLL_PAGE = 1000
# Text of qdrant_edge's errors (it raises bare Exception): a point absent for
# an update, and a config that does not match the segments on disk.
_MISSING_POINT = "No point with id"
_INCOMPATIBLE = "incompatible"
_LOCKED = "WouldBlock"  # the write-ahead log is locked by another process
# Payload keys kept as engine values (filters, payload indexes, id lookups);
# the rest travels as one JSON text under _PACKED_KEY (see the module docstring).
_NATIVE_KEYS = frozenset({ID_KEY, CATEGORY_KEY, PRICE_KEY})
_PACKED_KEY = "_packed_json"
# In a shard's directory: the point-id format its points use ("2": integer
# ``point_id``); a shard without it was written with UUID ids (format 1).
_FORMAT_FILE = "streamrec_point_ids"
_FORMAT = "2"
# int8 scalar quantization of a search vector, kept in RAM; searches rescore with the stored vectors.
_INT8 = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
_IGNORE_INT8 = qe.QuantizationSearchParams(ignore=True)


def _rescore(hnsw_ef: int, limit: int) -> qe.QuantizationSearchParams:
    """An ANN search walks the int8 copy (where there is one) and rescores with the stored
    vectors, so its scores are exact; it rescores every hit its graph walk keeps anyway
    (``hnsw_ef`` of them, oversampling ``hnsw_ef / limit``), which costs the walk nothing
    and keeps recall at the float search's (docs/performance.md, "int8 search copy").
    An exact search reads the stored vectors alone."""
    return qe.QuantizationSearchParams(rescore=True, oversampling=max(1.0, hnsw_ef / limit))


class EdgeStore(VectorStore):
    """A ``VectorStore`` over in-process qdrant-edge shards.

    ``hnsw_ef`` is set on every ANN search: the engine's default gives poor
    recall at top-100. ``indexing_threshold_kb`` and ``full_scan_threshold_kb``
    decide when a segment gets an HNSW graph and when a search scans instead
    (None keeps the engine's defaults; below them search is exact anyway).
    They only take effect for collections this store creates or reopens.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        hnsw_ef: int = 256,
        hnsw_m: int = 16,
        ef_construct: int = 100,
        indexing_threshold_kb: int | None = None,
        full_scan_threshold_kb: int = 10_000,
        max_search_threads: int | None = None,
        quantization: str = "auto",
    ) -> None:
        if hnsw_ef < 1:
            raise ConfigError(f"hnsw_ef must be positive, got {hnsw_ef}")
        self._quantization = check_quantization(quantization)
        self._data_dir = Path(data_dir)
        self._hnsw_ef = hnsw_ef
        self._hnsw = qe.HnswIndexConfig(
            m=hnsw_m, ef_construct=ef_construct, full_scan_threshold=full_scan_threshold_kb
        )
        self._optimizers = (
            qe.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb)
            if indexing_threshold_kb is not None
            else None
        )
        self._max_search_threads = max_search_threads
        self._shards: dict[str, tuple[CollectionSpec, qe.EdgeShard]] = {}
        # Guards opening and closing shards, not their use.
        self._registry_lock = threading.Lock()
        self._closed = False

    # -- collections -------------------------------------------------------

    def ensure_collection(self, spec: CollectionSpec) -> None:
        with self._registry_lock:
            if self._closed:
                raise StoreUnavailableError("edge store is closed")
            open_spec = self._shards.get(spec.name)
            if open_spec is not None:
                check_same_spec(spec, open_spec[0])
                return
            path = self._data_dir / spec.name
            if path.is_dir() and any(path.iterdir()):
                stored = _stored_config(path)
                config = self._edge_config(spec, half=_stored_half(stored, spec),
                                           quantized=_stored_quantized(stored, spec, self._quantization))
                shard = _open_existing(path, config, spec)
                if not (path / _FORMAT_FILE).is_file():
                    try:
                        converted = _guard(f"convert {spec.name!r} to integer point ids",
                                           lambda: _convert_uuid_points(shard))
                    except StoreUnavailableError:
                        shard.close()
                        raise
                    log.info("collection %s: %d points converted to integer point ids", spec.name, converted)
                    if converted:  # rewritten points left the indexed segments: index them again
                        _guard(f"optimize {spec.name!r}", shard.optimize)
                    _write_format(path)
            else:
                config = self._edge_config(spec, half=spec.half,
                                           quantized=int8_vectors(spec, self._quantization))
                shard = _guard(
                    f"create collection {spec.name!r}",
                    lambda: qe.EdgeShard.create(str(path), config),
                )
                _write_format(path)
            try:
                _guard(f"index payload of {spec.name!r}", lambda: _index_payload(shard))
            except StoreUnavailableError:
                shard.close()  # release the log's lock so a retry can open it
                raise
            self._shards[spec.name] = (spec, shard)

    def drop_collection(self, name: str) -> None:
        with self._registry_lock:
            if self._closed:
                raise StoreUnavailableError("edge store is closed")
            opened = self._shards.pop(name, None)
            if opened is not None:
                _guard(f"close {name!r}", opened[1].close)
            path = self._data_dir / name
            if path.parent != self._data_dir:  # a name with a separator would leave the store
                raise ValueError(f"not a collection name: {name!r}")
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreUnavailableError(f"edge store: drop {name!r} failed: {exc}") from exc

    def _edge_config(self, spec: CollectionSpec, *, half: frozenset[str], quantized: frozenset[str]) -> qe.EdgeConfig:
        return qe.EdgeConfig(
            vectors={
                name: qe.EdgeVectorParams(
                    size=dim,
                    distance=qe.Distance.Dot if name in spec.dot else qe.Distance.Cosine,
                    datatype=qe.VectorStorageDatatype.Float16 if name in half else None,
                    quantization_config=_INT8 if name in quantized else None,
                    memory=qe.Memory.Cold if name in spec.cold else None,
                )
                for name, dim in spec.vectors.items()
            },
            hnsw_config=self._hnsw,
            optimizers=self._optimizers,
            max_search_threads=self._max_search_threads,
            wal_enabled=True,
        )

    def _shard(self, collection: str) -> tuple[CollectionSpec, qe.EdgeShard]:
        if self._closed:
            raise StoreUnavailableError("edge store is closed")
        try:
            return self._shards[collection]
        except KeyError:
            raise ConfigError(
                f"collection {collection!r} is not open; call ensure_collection first"
            ) from None

    # -- writes ------------------------------------------------------------

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        spec, shard = self._shard(collection)
        edge_points = [
            qe.Point(pid, vectors, _pack(stored_payload(point)))
            for pid, point, vectors in zip(check_distinct_points(points), points, _checked_vectors(spec, points))
        ]
        if edge_points:
            operation = qe.UpdateOperation.upsert_points(edge_points)
            _guard(f"upsert into {collection!r}", lambda: shard.update(operation))

    def update_payload(self, collection: str, domain_id: str, payload: dict[str, Any]) -> None:
        _, shard = self._shard(collection)
        checked = check_payload(payload)
        uid = point_id(domain_id)
        # Packed keys cannot be merged by the engine: read, merge, write back whole.
        records = _guard(f"retrieve from {collection!r}", lambda: shard.retrieve([uid], True, False))
        if not records:
            raise KeyError(domain_id)
        merged = {**_unpack(records[0].payload), **checked}
        operation = qe.UpdateOperation.overwrite_payload([uid], _pack(merged))
        _update_existing(shard, operation, collection, domain_id)

    def update_vectors(
        self, collection: str, domain_id: str, vectors: Mapping[str, np.ndarray]
    ) -> None:
        spec, shard = self._shard(collection)
        checked = {name: check_vector(spec, name, vec) for name, vec in vectors.items()}
        if not checked:
            return
        point_vectors = qe.PointVectors(point_id(domain_id), checked)
        operation = qe.UpdateOperation.update_vectors([point_vectors])
        _update_existing(shard, operation, collection, domain_id)

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        _, shard = self._shard(collection)
        if ids:
            operation = qe.UpdateOperation.delete_points([point_id(i) for i in ids])
            _guard(f"delete from {collection!r}", lambda: shard.update(operation))

    # -- reads -------------------------------------------------------------

    def retrieve(
        self, collection: str, ids: Sequence[str], with_vectors: WithVectors = False
    ) -> dict[str, Hit]:
        spec, shard = self._shard(collection)
        vectors = wanted_vectors(spec, with_vectors)
        if not ids:
            return {}
        records = _guard(
            f"retrieve from {collection!r}",
            lambda: shard.retrieve([point_id(i) for i in ids], True, vectors),
        )
        hits = (to_hit(_unpack(record.payload), 0.0, named_vectors(record.vector)) for record in records)
        return {hit.id: hit for hit in hits}

    def retrieve_points(
        self, collection: str, point_ids: Sequence[int] | np.ndarray, with_vectors: WithVectors = False
    ) -> dict[int, Hit]:
        spec, shard = self._shard(collection)
        vectors = wanted_vectors(spec, with_vectors)
        wanted = [int(p) for p in point_ids]
        if not wanted:
            return {}
        records = _guard(f"retrieve from {collection!r}", lambda: shard.retrieve(wanted, True, vectors))
        return {
            int(record.id): to_hit(_unpack(record.payload), 0.0, named_vectors(record.vector))
            for record in records
        }

    def search(
        self,
        collection: str,
        vector_name: str,
        vector: np.ndarray,
        limit: int,
        flt: SearchFilter | None = None,
        with_vectors: WithVectors = False,
        exact: bool = False,
        with_payload: bool = True,
    ) -> list[Hit]:
        spec, shard = self._shard(collection)
        query = check_vector(spec, vector_name, vector)
        request = self._request(spec, vector_name, query, limit, flt, with_vectors, exact, with_payload)
        points = _guard(f"search {collection!r}", lambda: shard.query(request))
        if not with_payload and not with_vectors:
            # Candidate retrieval: ids and scores of hundreds of hits per request.
            return [Hit(str(p.payload[ID_KEY]), float(p.score), {}) for p in points]
        return [to_hit(_unpack(p.payload), p.score, named_vectors(p.vector)) for p in points]

    def search_points(
        self,
        collection: str,
        vector_name: str,
        vector: np.ndarray,
        limit: int,
        flt: SearchFilter | None = None,
        exact: bool = False,
        use_int8: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        spec, shard = self._shard(collection)
        query = check_vector(spec, vector_name, vector)
        request = self._request(spec, vector_name, query, limit, flt, False, exact, with_payload=None,
                                use_int8=use_int8)
        points = _guard(f"search {collection!r}", lambda: shard.query(request))
        count = len(points)
        ids = np.fromiter((p.id for p in points), np.int64, count)
        scores = np.fromiter((p.score for p in points), np.float32, count)
        return ids, scores

    def search_batch(
        self,
        collection: str,
        vector_name: str,
        vectors: np.ndarray,
        limit: int,
        flt: SearchFilter | None = None,
    ) -> list[list[Hit]]:
        spec, shard = self._shard(collection)
        rows = check_query_matrix(spec, vector_name, vectors)
        if not rows:
            return []
        batch = qe.QueryBatchRequest(
            [self._request(spec, vector_name, row, limit, flt, False, False) for row in rows]
        )
        results = _guard(f"search {collection!r}", lambda: shard.query_batch(batch))
        return [[to_hit(_unpack(p.payload), p.score, None) for p in points] for points in results]

    def _request(
        self,
        spec: CollectionSpec,
        vector_name: str,
        query: list[float],
        limit: int,
        flt: SearchFilter | None,
        with_vectors: WithVectors,
        exact: bool,
        with_payload: bool | None = True,
        use_int8: bool = True,
    ) -> qe.QueryRequest:
        """``with_payload``: True all of it, False only the domain id, None none (point ids only)."""
        check_limit(limit)
        return qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(query, using=vector_name),
            filter=_edge_filter(flt),
            with_payload=False if with_payload is None else (True if with_payload else [ID_KEY]),
            with_vector=wanted_vectors(spec, with_vectors),
            params=qe.SearchParams(hnsw_ef=self._hnsw_ef, exact=exact,
                                   quantization=_rescore(self._hnsw_ef, limit) if use_int8 and not exact
                                   else _IGNORE_INT8),
        )

    def count(self, collection: str) -> int:
        _, shard = self._shard(collection)
        return _guard(f"count {collection!r}", lambda: shard.count(qe.CountRequest(exact=True)))

    def scroll_ids(self, collection: str) -> Iterator[str]:
        _, shard = self._shard(collection)
        offset: Any = None
        while True:
            request = qe.ScrollRequest(
                offset=offset, limit=_SCROLL_PAGE, with_payload=[ID_KEY], with_vector=False
            )
            records, offset = _guard(f"scroll {collection!r}", lambda: shard.scroll(request))
            for record in records:
                yield str(record.payload[ID_KEY])
            if offset is None:
                return

    def indexed_vector_count(self, collection: str) -> int:
        """Vectors covered by an HNSW graph (0 until ``optimize`` indexes a segment)."""
        _, shard = self._shard(collection)
        return _guard(f"inspect {collection!r}", lambda: shard.info().indexed_vectors_count)

    def unindexed_vector_count(self, collection: str) -> int:
        """Stored vectors (all names together) that no HNSW graph covers: what ``optimize`` would index.

        Searches scan these one by one, so the count says when an index build pays off.
        """
        spec, shard = self._shard(collection)

        def with_vector(name: str) -> int:
            having = qe.Filter(must=[qe.HasVectorCondition(name)])
            return shard.count(qe.CountRequest(exact=True, filter=having))

        stored = _guard(f"inspect {collection!r}", lambda: sum(with_vector(name) for name in spec.vectors))
        return max(0, stored - self.indexed_vector_count(collection))

    # -- lifecycle ---------------------------------------------------------

    def optimize(self, collection: str) -> None:
        _, shard = self._shard(collection)
        _guard(f"optimize {collection!r}", shard.optimize)

    def flush(self) -> None:
        for name, (_, shard) in list(self._shards.items()):
            _guard(f"flush {name!r}", shard.flush)

    def close(self) -> None:
        with self._registry_lock:
            if self._closed:
                return
            self._closed = True
            shards, self._shards = self._shards, {}
        for name, (_, shard) in shards.items():
            _guard(f"close {name!r}", shard.close)


def _guard(what: str, call: Callable[[], T]) -> T:
    """Run one engine call; its failures become ``StoreUnavailableError``."""
    try:
        return call()
    except Exception as exc:  # qdrant_edge raises bare Exception for everything
        raise StoreUnavailableError(f"edge store: {what} failed: {exc}") from exc


def _checked_vectors(spec: CollectionSpec, points: Sequence[Point]) -> list[dict[str, list[float]]]:
    """Each point's vectors as float lists, checked as ``check_vector`` does, one name at a time.

    One stacked check and one ``tolist`` per vector name cost a fraction of
    checking point by point; a batch that fails is checked point by point, so
    the error names the offending vector exactly as ``check_vector`` does.
    """
    checked: list[dict[str, list[float]]] = [{} for _ in points]
    for name in {name for point in points for name in point.vectors}:
        holders = [n for n, point in enumerate(points) if name in point.vectors]
        try:
            matrix = np.asarray([points[n].vectors[name] for n in holders], dtype=np.float32)  # (n, dim)
        except (TypeError, ValueError):  # ragged or not numbers
            matrix = None
        sound = (
            matrix is not None
            and matrix.shape == (len(holders), spec.vectors.get(name))
            and bool(np.isfinite(matrix).all())
            and bool((np.einsum("ij,ij->i", matrix, matrix) > 0.0).all())
        )
        rows = matrix.tolist() if sound else [check_vector(spec, name, points[n].vectors[name]) for n in holders]  # type: ignore[union-attr]
        for n, row in zip(holders, rows):
            checked[n][name] = row
    return checked


def _pack(payload: dict[str, Any]) -> dict[str, Any]:
    """The engine's form of a payload: native keys as values, the rest as one JSON text."""
    if _PACKED_KEY in payload:
        raise ValueError(f"payload key {_PACKED_KEY!r} is reserved by the edge store")
    packed = {key: value for key, value in payload.items() if key in _NATIVE_KEYS}
    rest = {key: value for key, value in payload.items() if key not in _NATIVE_KEYS}
    if rest:
        packed[_PACKED_KEY] = pydantic_core.to_json(rest, fallback=_plain).decode()
    return packed


def _unpack(payload: dict[str, Any] | None) -> dict[str, Any] | None:
    if not payload or _PACKED_KEY not in payload:
        return payload  # nothing packed, or written before payloads were packed
    rest = pydantic_core.from_json(payload.pop(_PACKED_KEY))
    rest.update(payload)
    return rest


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in a payload, as the engine itself would take them."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise ValueError(f"payload value of type {type(value).__name__} cannot be stored")


def _index_payload(shard: qe.EdgeShard) -> None:
    # Keyword and float indexes make category and price filters cheap and let
    # the HNSW graph stay connected inside one category. Creating one again
    # is a no-op, so reopening a shard is safe.
    keyword, number = qe.PayloadSchemaType.Keyword, qe.PayloadSchemaType.Float
    shard.update(qe.UpdateOperation.create_field_index(CATEGORY_KEY, keyword))
    shard.update(qe.UpdateOperation.create_field_index(PRICE_KEY, number))


def _update_existing(shard: qe.EdgeShard, operation: Any, collection: str, domain_id: str) -> None:
    try:
        shard.update(operation)
    except Exception as exc:
        if _MISSING_POINT in str(exc):
            raise KeyError(domain_id) from None
        raise StoreUnavailableError(
            f"edge store: update of {domain_id!r} in {collection!r} failed: {exc}"
        ) from exc


def _convert_uuid_points(shard: qe.EdgeShard) -> int:
    """Rewrite format-1 points (UUID ids) under their integer ``point_id``; how many were converted.

    Safe to interrupt and run again: a point is written under its new id
    before its old one is deleted, and both carry the same payload.
    """
    old: list[Any] = []
    offset: Any = None
    while True:
        request = qe.ScrollRequest(offset=offset, limit=_SCROLL_PAGE, with_payload=False, with_vector=False)
        records, offset = shard.scroll(request)
        old.extend(r.id for r in records if not isinstance(r.id, int))
        if offset is None:
            break
    for start in range(0, len(old), _SCROLL_PAGE):
        records = shard.retrieve(old[start : start + _SCROLL_PAGE], True, True)
        points = [qe.Point(point_id(str(r.payload[ID_KEY])), named_vectors(r.vector) or {}, r.payload)
                  for r in records]
        shard.update(qe.UpdateOperation.upsert_points(points))
        shard.update(qe.UpdateOperation.delete_points([r.id for r in records]))
    return len(old)


def _write_format(path: Path) -> None:
    try:
        (path / _FORMAT_FILE).write_text(_FORMAT + "\n")
    except OSError as exc:
        raise StoreUnavailableError(f"edge store: cannot write {path / _FORMAT_FILE}: {exc}") from exc


def _stored_config(path: Path) -> dict[str, Any] | None:
    """The vectors' config the shard at ``path`` was built with; None if unreadable."""
    try:
        stored = json.loads((path / "edge_config.json").read_text())["vectors"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stored if isinstance(stored, dict) else None


def _stored_quantized(stored: dict[str, Any] | None, spec: CollectionSpec, quantization: str) -> frozenset[str]:
    """The vectors of ``spec.quantized`` that the shard keeps an int8 copy of.

    The engine would accept a new quantization for an existing shard, but its
    segments get the copy only when rebuilt (a full ``optimize``, tens of
    seconds at 100k items, never inside a serving worker): an existing
    collection keeps how it was built, and the next rebuild applies the setting.
    """
    wanted = int8_vectors(spec, quantization)
    if stored is None:
        return wanted
    kept = frozenset(name for name in spec.quantized if (stored.get(name) or {}).get("quantization_config"))
    if kept != wanted:
        log.info("collection %s keeps its %s vectors as built (int8 copy: %s); a rebuild applies "
                 "STREAMREC_QUANTIZATION", spec.name, ", ".join(sorted(spec.quantized)), bool(kept))
    return kept


def _stored_half(stored: dict[str, Any] | None, spec: CollectionSpec) -> frozenset[str]:
    """The vectors of ``spec.half`` that the shard really stores as float16.

    A collection created before its spec asked for half precision keeps float32
    (the engine cannot convert a shard in place); the next rebuild, a model
    swap, writes new collections in float16.
    """
    if stored is None:
        return spec.half  # the engine's own check decides
    kept = frozenset(name for name in spec.half if (stored.get(name) or {}).get("datatype") == "float16")
    if kept != spec.half:
        log.info("collection %s keeps float32 %s vectors (created before half precision)",
                 spec.name, ", ".join(sorted(spec.half - kept)))
    return kept


def _open_existing(path: Path, config: qe.EdgeConfig, spec: CollectionSpec) -> qe.EdgeShard:
    try:
        return qe.EdgeShard.load(str(path), config)
    except Exception as exc:
        if _LOCKED in str(exc):
            raise StoreInUseError(
                f"the embedded store {path.parent} is open in another process (a running worker?); "
                "it opens in one process at a time"
            ) from exc
        if _INCOMPATIBLE in str(exc).lower():
            raise ConfigError(
                f"collection {spec.name!r} in {path} does not match {spec.vectors}: {exc}"
            ) from exc
        raise StoreUnavailableError(f"edge store: cannot open {path}: {exc}") from exc



def _edge_filter(flt: SearchFilter | None) -> qe.Filter | None:
    if flt is None or flt.is_empty:
        return None
    check_price_bounds(flt)
    must: list[Any] = []
    if flt.categories:
        must.append(qe.FieldCondition(CATEGORY_KEY, match=qe.MatchAny(list(flt.categories))))
    if flt.min_price is not None or flt.max_price is not None:
        price_range = qe.RangeFloat(gte=flt.min_price, lte=flt.max_price)
        must.append(qe.FieldCondition(PRICE_KEY, range=price_range))
    must_not: list[Any] = []
    if flt.exclude_ids or flt.exclude_points:
        must_not.append(qe.HasIdCondition(flt.excluded_points()))
    return qe.Filter(must=must or None, must_not=must_not or None)
