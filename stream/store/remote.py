"""Production backend: a Qdrant server through ``qdrant_client``.

Also runs on the client's local mode (``QdrantClient(location=":memory:")``),
which the contract tests use. Local mode has no ANN index and scans every
point, so it answers exactly and ignores search parameters; it is for tests,
not serving. The server builds its indexes itself, so ``optimize`` is a no-op.

Point ids are integers (``point_id``, format 2). A collection written with the
UUID point ids of format 1 is refused at open, with the way to convert it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ApiException, UnexpectedResponse

from core.errors import ConfigError, StoreUnavailableError
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
    check_same_vectors,
    check_vector,
    int8_vectors,
    named_vectors,
    point_id,
    stored_payload,
    to_hit,
    wanted_vectors,
)

T = TypeVar("T")

_SCROLL_PAGE = 1000
_HTTP_NOT_FOUND = 404
_HTTP_CONFLICT = 409
_INT8 = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
    type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
# Keyword and float indexes make category and price filters cheap and keep
# the HNSW graph connected inside one category; re-creating one is a no-op.
_PAYLOAD_INDEXES = {
    CATEGORY_KEY: models.PayloadSchemaType.KEYWORD,
    PRICE_KEY: models.PayloadSchemaType.FLOAT,
}


class RemoteStore(VectorStore):
    """A ``VectorStore`` over a ``QdrantClient``; fails fast if the server is unreachable."""

    def __init__(self, client: QdrantClient, *, hnsw_ef: int = 256, quantization: str = "auto") -> None:
        if hnsw_ef < 1:
            raise ConfigError(f"hnsw_ef must be positive, got {hnsw_ef}")
        self._quantization = check_quantization(quantization)
        self._client = client
        self._hnsw_ef = hnsw_ef
        options = client.init_options
        self._local = options.get("location") == ":memory:" or options.get("path") is not None
        self._specs: dict[str, CollectionSpec] = {}
        self._closed = False
        # Local mode keeps collections in plain numpy arrays: a search while
        # another thread upserts fails (IndexError, measured), so its calls
        # are serialised. A server client is safe to share between threads.
        self._serial: AbstractContextManager[Any] = (
            threading.Lock() if self._local else nullcontext()
        )
        where = options.get("url") or options.get("host") or options.get("location") or "local"
        self._call(f"connect to {where}", client.get_collections)

    # -- collections -------------------------------------------------------

    def ensure_collection(self, spec: CollectionSpec) -> None:
        known = self._specs.get(spec.name)
        if known is not None:
            check_same_spec(spec, known)
            return
        client = self._live_client()
        if not self._call(f"look up {spec.name!r}", lambda: client.collection_exists(spec.name)):
            self._create(spec)
        info = self._call(f"describe {spec.name!r}", lambda: client.get_collection(spec.name))
        check_same_vectors(spec, _stored_dims(spec, info.config.params.vectors))
        if not self._local:  # local mode has no payload indexes and warns about them
            for key, schema in _PAYLOAD_INDEXES.items():
                index_key = partial(client.create_payload_index, spec.name, key, schema, wait=True)
                self._call(f"index {key!r} of {spec.name!r}", index_key)
        self._check_point_format(spec.name)
        self._specs[spec.name] = spec

    def _check_point_format(self, collection: str) -> None:
        """``ConfigError`` for a collection written with format-1 (UUID) point ids.

        This backend never writes UUID ids into a collection it opened, so the
        first point tells.
        """
        records, _ = self._call(
            f"inspect {collection!r}",
            lambda: self._client.scroll(collection, limit=1, with_payload=False, with_vectors=False),
        )
        if records and not isinstance(records[0].id, int):
            raise ConfigError(
                f"collection {collection!r} holds points with UUID ids (written before integer point ids); "
                "rebuild it: drop it and load the catalogue again (`streamrec load-catalogue FILE`), "
                "or open it once with the embedded store, which converts its own shards"
            )

    def _create(self, spec: CollectionSpec) -> None:
        int8 = int8_vectors(spec, self._quantization)
        vectors_config = {
            name: models.VectorParams(
                size=dim,
                distance=models.Distance.DOT if name in spec.dot else models.Distance.COSINE,
                datatype=models.Datatype.FLOAT16 if name in spec.half else None,
                # The server keeps the int8 copy and builds it with the segment (stream.store.base).
                quantization_config=_INT8 if name in int8 else None,
                on_disk=True if name in spec.cold else None,
            )
            for name, dim in spec.vectors.items()
        }
        try:
            with self._serial:
                self._live_client().create_collection(spec.name, vectors_config=vectors_config)
        except UnexpectedResponse as exc:
            # Another process created it between our check and our create:
            # the caller compares dimensions next, so that is fine.
            if exc.status_code != _HTTP_CONFLICT:
                raise _unavailable(f"create {spec.name!r}", exc) from exc
        except (ApiException, RuntimeError, OSError) as exc:
            raise _unavailable(f"create {spec.name!r}", exc) from exc

    def drop_collection(self, name: str) -> None:
        client = self._live_client()
        self._specs.pop(name, None)
        # delete_collection answers False (not an error) for a name that does not exist.
        self._call(f"drop {name!r}", lambda: client.delete_collection(name))

    def _spec(self, collection: str) -> CollectionSpec:
        self._live_client()
        try:
            return self._specs[collection]
        except KeyError:
            raise ConfigError(
                f"collection {collection!r} is not open; call ensure_collection first"
            ) from None

    def _call(self, what: str, call: Callable[[], T]) -> T:
        with self._serial:
            return _guard(what, call)

    def _live_client(self) -> QdrantClient:
        if self._closed:
            raise StoreUnavailableError("qdrant store is closed")
        return self._client

    # -- writes ------------------------------------------------------------

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        spec = self._spec(collection)
        structs = [
            models.PointStruct(
                id=pid,
                vector={name: check_vector(spec, name, v) for name, v in point.vectors.items()},
                payload=stored_payload(point),
            )
            for pid, point in zip(check_distinct_points(points), points)
        ]
        if structs:
            self._call(
                f"upsert into {collection!r}",
                lambda: self._client.upsert(collection, points=structs, wait=True),
            )

    def update_payload(self, collection: str, domain_id: str, payload: dict[str, Any]) -> None:
        self._spec(collection)
        checked = check_payload(payload)
        selector = [point_id(domain_id)]
        self._update_existing(
            collection,
            domain_id,
            lambda: self._client.set_payload(collection, checked, points=selector, wait=True),
        )

    def update_vectors(
        self, collection: str, domain_id: str, vectors: Mapping[str, np.ndarray]
    ) -> None:
        spec = self._spec(collection)
        checked = {name: check_vector(spec, name, v) for name, v in vectors.items()}
        if not checked:
            return
        point = models.PointVectors(id=point_id(domain_id), vector=checked)
        self._update_existing(
            collection,
            domain_id,
            lambda: self._client.update_vectors(collection, [point], wait=True),
        )

    def _update_existing(self, collection: str, domain_id: str, call: Callable[[], Any]) -> None:
        try:
            with self._serial:
                call()
        except KeyError:  # local mode's answer for an absent point
            raise KeyError(domain_id) from None
        except UnexpectedResponse as exc:
            if exc.status_code == _HTTP_NOT_FOUND:
                raise KeyError(domain_id) from None
            raise _unavailable(f"update {domain_id!r} in {collection!r}", exc) from exc
        except (ApiException, RuntimeError, OSError) as exc:
            raise _unavailable(f"update {domain_id!r} in {collection!r}", exc) from exc

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        self._spec(collection)
        if ids:
            selector = models.PointIdsList(points=[point_id(i) for i in ids])
            self._call(
                f"delete from {collection!r}",
                lambda: self._client.delete(collection, points_selector=selector, wait=True),
            )

    # -- reads -------------------------------------------------------------

    def retrieve(
        self, collection: str, ids: Sequence[str], with_vectors: WithVectors = False
    ) -> dict[str, Hit]:
        spec = self._spec(collection)
        vectors = wanted_vectors(spec, with_vectors)
        if not ids:
            return {}
        wanted = [point_id(i) for i in ids]
        records = self._call(
            f"retrieve from {collection!r}",
            lambda: self._client.retrieve(
                collection, wanted, with_payload=True, with_vectors=vectors
            ),
        )
        hits = (to_hit(r.payload, 0.0, named_vectors(r.vector)) for r in records)
        return {hit.id: hit for hit in hits}

    def retrieve_points(
        self, collection: str, point_ids: Sequence[int] | np.ndarray, with_vectors: WithVectors = False
    ) -> dict[int, Hit]:
        spec = self._spec(collection)
        vectors = wanted_vectors(spec, with_vectors)
        wanted = [int(p) for p in point_ids]
        if not wanted:
            return {}
        records = self._call(
            f"retrieve from {collection!r}",
            lambda: self._client.retrieve(collection, wanted, with_payload=True, with_vectors=vectors),
        )
        return {int(r.id): to_hit(r.payload, 0.0, named_vectors(r.vector)) for r in records}

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
        vectors = wanted_vectors(self._spec(collection), with_vectors)
        points = self._query(collection, vector_name, vector, limit, flt, exact,
                             with_payload=True if with_payload else [ID_KEY], with_vectors=vectors)
        return [to_hit(p.payload, p.score, named_vectors(p.vector)) for p in points]

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
        hits = self._query(collection, vector_name, vector, limit, flt, exact, with_payload=False, with_vectors=False,
                           use_int8=use_int8)
        ids = np.fromiter((p.id for p in hits), np.int64, len(hits))
        scores = np.fromiter((p.score for p in hits), np.float32, len(hits))
        return ids, scores

    def _query(self, collection: str, vector_name: str, vector: np.ndarray, limit: int,
               flt: SearchFilter | None, exact: bool, *, with_payload: Any, with_vectors: Any,
               use_int8: bool = True) -> list[Any]:
        """One nearest-neighbour query; its scored points as the client returns them."""
        query = check_vector(self._spec(collection), vector_name, vector)
        check_limit(limit)
        query_filter = _qdrant_filter(flt)
        response = self._call(
            f"search {collection!r}",
            lambda: self._client.query_points(
                collection,
                query=query,
                using=vector_name,
                limit=limit,
                query_filter=query_filter,
                with_payload=with_payload,
                with_vectors=with_vectors,
                search_params=self._search_params(exact, limit, use_int8),
            ),
        )
        return list(response.points)

    def search_batch(
        self,
        collection: str,
        vector_name: str,
        vectors: np.ndarray,
        limit: int,
        flt: SearchFilter | None = None,
    ) -> list[list[Hit]]:
        spec = self._spec(collection)
        rows = check_query_matrix(spec, vector_name, vectors)
        check_limit(limit)
        if not rows:
            return []
        query_filter = _qdrant_filter(flt)
        requests = [
            models.QueryRequest(
                query=row,
                using=vector_name,
                limit=limit,
                filter=query_filter,
                with_payload=True,
                params=self._search_params(False, limit),
            )
            for row in rows
        ]
        responses = self._call(
            f"search {collection!r}",
            lambda: self._client.query_batch_points(collection, requests=requests),
        )
        return [[to_hit(p.payload, p.score, None) for p in r.points] for r in responses]

    def _search_params(self, exact: bool, limit: int, use_int8: bool = True) -> models.SearchParams | None:
        # Local mode always scans exactly and warns when given search params.
        if self._local:
            return None
        # As the edge store: rescored to exact scores, every hit the graph walk keeps (stream.store.edge).
        quantization = models.QuantizationSearchParams(ignore=True) if exact or not use_int8 else \
            models.QuantizationSearchParams(rescore=True, oversampling=max(1.0, self._hnsw_ef / limit))
        return models.SearchParams(hnsw_ef=self._hnsw_ef, exact=exact, quantization=quantization)

    def count(self, collection: str) -> int:
        self._spec(collection)
        result = self._call(
            f"count {collection!r}", lambda: self._client.count(collection, exact=True)
        )
        return int(result.count)

    def scroll_ids(self, collection: str) -> Iterator[str]:
        self._spec(collection)
        offset: Any = None
        while True:
            page_start = offset
            records, offset = self._call(
                f"scroll {collection!r}",
                lambda: self._client.scroll(
                    collection,
                    limit=_SCROLL_PAGE,
                    offset=page_start,
                    with_payload=[ID_KEY],
                    with_vectors=False,
                ),
            )
            for record in records:
                yield str((record.payload or {})[ID_KEY])
            if offset is None:
                return

    # -- lifecycle ---------------------------------------------------------

    def optimize(self, collection: str) -> None:
        self._spec(collection)  # the server indexes on its own schedule

    def flush(self) -> None:
        self._live_client()  # writes are acknowledged with wait=True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call("close", self._client.close)


def _guard(what: str, call: Callable[[], T]) -> T:
    """Run one client call; transport and server failures become ``StoreUnavailableError``."""
    try:
        return call()
    # ApiException covers refused connections and non-2xx answers; local mode
    # raises RuntimeError once closed.
    except (ApiException, RuntimeError, OSError) as exc:
        raise _unavailable(what, exc) from exc


def _unavailable(what: str, exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"qdrant store: {what} failed: {exc}")


def _stored_dims(spec: CollectionSpec, vectors: Any) -> dict[str, int]:
    collection = spec.name
    if not isinstance(vectors, dict):
        raise ConfigError(f"collection {collection!r} exists with one unnamed vector")
    dims: dict[str, int] = {}
    for name, params in vectors.items():
        expected = models.Distance.DOT if name in spec.dot else models.Distance.COSINE
        if params.distance != expected:
            raise ConfigError(
                f"collection {collection!r}: vector {name!r} uses {params.distance}, not {expected}"
            )
        dims[name] = int(params.size)
    return dims



def _qdrant_filter(flt: SearchFilter | None) -> models.Filter | None:
    if flt is None or flt.is_empty:
        return None
    check_price_bounds(flt)
    must: list[Any] = []
    if flt.categories:
        must.append(
            models.FieldCondition(key=CATEGORY_KEY, match=models.MatchAny(any=list(flt.categories)))
        )
    if flt.min_price is not None or flt.max_price is not None:
        must.append(
            models.FieldCondition(
                key=PRICE_KEY, range=models.Range(gte=flt.min_price, lte=flt.max_price)
            )
        )
    must_not: list[Any] = []
    if flt.exclude_ids or flt.exclude_points:
        must_not.append(models.HasIdCondition(has_id=sorted(flt.excluded_points())))
    return models.Filter(must=must or None, must_not=must_not or None)
