"""The vector-store interface every backend implements, and the checks they share.

A collection holds points keyed by a domain id (an item id, a user id). Each
point carries any subset of the collection's named vectors and a JSON payload.
All named vectors use cosine similarity: backends store them unit-normalised,
so vectors read back have norm 1 and scores are cosine similarities.

Qdrant only accepts integers or UUIDs as point ids. A domain id is mapped to
an integer, ``point_id(id)`` (the first 63 bits of its BLAKE2b digest: the
same in every process and on every machine, with no table to share), and kept
verbatim in the payload under the reserved key ``"id"``, which is the way back
from a point id to the domain id. Callers of the string verbs never see that
key: it comes back as ``Hit.id``. The hot path uses the integer verbs
(``search_points``, ``retrieve_points``, ``SearchFilter.exclude_points``):
ids and scores come back as numpy arrays and no payload is read per hit.

Two domain ids with the same point id would overwrite each other; with 63
bits that takes about 2^31 ids to be likely (about 5e-8 at a million ids), and
``upsert`` refuses a batch in which two ids collide. Stores written with the
earlier UUID point ids (format 1) are refused at open with a message saying
how to convert them (``stream.store.edge`` converts its own).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from core.errors import ConfigError

# The namespace of the UUID point ids of format 1 (before integer ids), kept to
# recognise and convert stores written then.
POINT_ID_NAMESPACE = uuid.UUID("7ac7671c-aad0-4a84-8726-9f083a8f9f68")
POINT_ID_MASK = (1 << 63) - 1  # non-negative int64, as numpy and the engine both hold it

# Payload key holding the domain id; reserved, so callers may not write it.
ID_KEY = "id"
CATEGORY_KEY = "category"
PRICE_KEY = "price"

# Collection names become directory names for the embedded backend.
_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


QUANTIZATIONS = ("auto", "int8", "none")  # how a store keeps the vectors a spec names in ``quantized``
# ``auto`` keeps an int8 copy of a searched vector this wide or wider. A wide
# space gains from it: at 1M x 384-d the index builds 3x faster and requests
# wait less, at the same recall. A trained model's narrow space loses recall to
# it: recall@100 at 300k items 0.84 (64-d) and 0.79 (128-d) with the copy, 1.00
# without, whose floats are small enough to walk (docs/performance.md, "int8
# search copy").
INT8_AUTO_MIN_DIM = 256


def check_quantization(quantization: str) -> str:
    """``quantization`` itself; ``ConfigError`` for an unknown value."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    return quantization


def int8_vectors(spec: CollectionSpec, quantization: str) -> frozenset[str]:
    """The vectors of ``spec.quantized`` that a collection created under ``quantization`` copies to int8."""
    if quantization == "auto":
        return frozenset(name for name in spec.quantized if spec.vectors[name] >= INT8_AUTO_MIN_DIM)
    return spec.quantized if check_quantization(quantization) == "int8" else frozenset()


@dataclass(frozen=True)
class CollectionSpec:
    """A collection's name and its named vectors (name -> dimension).

    Vectors are compared by cosine similarity, except those named in ``dot``:
    learned retrieval spaces score by dot product, where a vector's length
    carries meaning (e.g. popularity) and must not be normalised away.
    Vectors named in ``half`` are stored as 16-bit floats: content vectors,
    where three significant digits change no ranking and a 1280-d photo vector
    takes 2.5 KB instead of 5 (the engine keeps every named vector's slot for
    every point, photo or not). They read back as float32, rounded.
    Vectors named in ``quantized`` are the ones requests search by ANN: a
    store opened with int8 quantization keeps an int8 copy of them in RAM for
    the graph walk and rescores the best hits with the stored vectors, so the
    scores it returns are exact.
    Vectors named in ``cold`` stay on disk and are read through the page cache
    when asked for: content vectors, which a recommendation never searches (a
    visual search scans the photos through the page cache).
    Without it the engine keeps every point's slot of them resident: at a
    million items with 1280-d photo and 384-d text slots that is 3.2 GB of a
    worker's memory, photos or not (docs/performance.md, "Large catalogue").
    """

    name: str
    vectors: dict[str, int]
    dot: frozenset[str] = frozenset()
    half: frozenset[str] = frozenset()
    quantized: frozenset[str] = frozenset()
    cold: frozenset[str] = frozenset()

    def distance(self, vector_name: str) -> str:
        return "dot" if vector_name in self.dot else "cosine"

    def __post_init__(self) -> None:
        if not _COLLECTION_NAME.match(self.name):
            raise ConfigError(
                f"collection name {self.name!r} must be 1-64 letters, digits, '_' or '-'"
            )
        if not self.vectors:
            raise ConfigError(f"collection {self.name!r} needs at least one named vector")
        if not set(self.dot) <= set(self.vectors):
            raise ConfigError(f"collection {self.name!r}: dot names unknown vectors {set(self.dot) - set(self.vectors)}")
        if not set(self.half) <= set(self.vectors):
            raise ConfigError(f"collection {self.name!r}: half names unknown vectors {set(self.half) - set(self.vectors)}")
        if not set(self.quantized) <= set(self.vectors):
            raise ConfigError(f"collection {self.name!r}: quantized names unknown vectors "
                              f"{set(self.quantized) - set(self.vectors)}")
        if not set(self.cold) <= set(self.vectors) - set(self.quantized):
            raise ConfigError(f"collection {self.name!r}: cold names unknown or searched vectors "
                              f"{set(self.cold) - (set(self.vectors) - set(self.quantized))}")
        for vector_name, dim in self.vectors.items():
            if not vector_name or not isinstance(dim, int) or dim < 1:
                raise ConfigError(
                    f"collection {self.name!r}: vector {vector_name!r} needs a non-empty "
                    f"name and a positive integer dimension, got {dim!r}"
                )


@dataclass(frozen=True)
class Point:
    """One point to write. A vector name left out means the point has no such vector."""

    id: str
    vectors: dict[str, np.ndarray]
    payload: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"point id must be a non-empty string, got {self.id!r}")


@dataclass(frozen=True)
class Hit:
    """One point read back: a search result (score = cosine) or a retrieved record (score 0)."""

    id: str
    score: float
    payload: dict[str, Any]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchFilter:
    """Conditions a search result must meet; the default filter lets everything through."""

    categories: tuple[str, ...] = ()  # payload "category" must be one of these (empty = any)
    exclude_ids: tuple[str, ...] = ()  # domain ids to leave out
    exclude_points: tuple[int, ...] = ()  # point ids (``point_id``) to leave out, the hot path's form
    min_price: float | None = None  # payload "price" >= min_price
    max_price: float | None = None  # payload "price" <= max_price

    @property
    def is_empty(self) -> bool:
        return (
            not self.categories
            and not self.exclude_ids
            and not self.exclude_points
            and self.min_price is None
            and self.max_price is None
        )


    def excluded_points(self) -> set[int]:
        """Every excluded point id, from ``exclude_ids`` and ``exclude_points`` together."""
        return {point_id(i) for i in self.exclude_ids} | {int(p) for p in self.exclude_points}


WithVectors = bool | Sequence[str]


class VectorStore(ABC):
    """A few verbs over named-vector collections; see the module docstring for the model.

    Every collection must be opened with ``ensure_collection`` on this store
    object before other calls name it; otherwise they raise ``ConfigError``.
    Failures of the backend itself raise ``StoreUnavailableError``; bad
    arguments (wrong dimension, unknown vector name, zero vector) ``ValueError``.
    """

    @abstractmethod
    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection or open it; idempotent.

        Raises ``ConfigError`` when it exists with other vector names or dimensions.
        """

    @abstractmethod
    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        """Write points as one batch; each fully replaces any stored point with its id.

        Vectors and payload not given are gone afterwards (use ``update_payload``
        to change payload only). Written points are searchable on return.
        """

    @abstractmethod
    def update_payload(self, collection: str, point_id: str, payload: dict[str, Any]) -> None:
        """Merge top-level keys into a point's payload; ``KeyError`` if the point is absent."""

    @abstractmethod
    def update_vectors(
        self, collection: str, point_id: str, vectors: Mapping[str, np.ndarray]
    ) -> None:
        """Replace the named vectors given, keeping the point's other vectors and payload.

        ``KeyError`` if the point is absent. This is how a late image embedding
        joins an item without rewriting its text vector.
        """

    @abstractmethod
    def delete(self, collection: str, ids: Sequence[str]) -> None:
        """Remove points; ids that are not stored are ignored."""

    @abstractmethod
    def retrieve(
        self, collection: str, ids: Sequence[str], with_vectors: WithVectors = False
    ) -> dict[str, Hit]:
        """Stored points by id (score 0); ids not stored are absent from the result."""

    @abstractmethod
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
        """Nearest points by cosine on ``vector_name``, best first.

        Only points that have that vector can be returned. ``exact`` skips the
        ANN index and scores every candidate. ``with_payload=False`` returns
        ids and scores only (empty payloads): the cheap form for candidate
        retrieval.
        """

    @abstractmethod
    def search_batch(
        self,
        collection: str,
        vector_name: str,
        vectors: np.ndarray,
        limit: int,
        flt: SearchFilter | None = None,
    ) -> list[list[Hit]]:
        """``search`` for each row of ``vectors`` (Q, dim), as one request; Q lists back."""

    @abstractmethod
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
        """``search`` for the hot path: (point ids int64, scores float32), best first.

        No payload is read and no per-hit object is kept; map ids back with
        ``retrieve_points`` (or a cache keyed by ``point_id``). ``use_int8``
        False walks the stored floats where an int8 copy exists (the same
        graph: what a store without the copy does, for comparisons).
        """

    @abstractmethod
    def retrieve_points(
        self, collection: str, point_ids: Sequence[int] | np.ndarray, with_vectors: WithVectors = False
    ) -> dict[int, Hit]:
        """Stored points by point id (score 0), keyed by point id; ids not stored are absent."""

    @abstractmethod
    def count(self, collection: str) -> int:
        """Number of points stored (with or without any vector)."""

    @abstractmethod
    def scroll_ids(self, collection: str) -> Iterator[str]:
        """Every stored domain id, in no particular order."""

    @abstractmethod
    def drop_collection(self, name: str) -> None:
        """Delete a collection and everything in it; a name that does not exist is ignored.

        Later calls that name it raise ``ConfigError`` until ``ensure_collection``
        creates it again (empty).
        """

    @abstractmethod
    def optimize(self, collection: str) -> None:
        """Build the ANN index over what is stored; blocks until done."""

    @abstractmethod
    def flush(self) -> None:
        """Make every write so far durable."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend; the store is unusable afterwards."""

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@functools.lru_cache(maxsize=1 << 18)
def point_id(domain_id: str) -> int:
    """The qdrant point id of a domain id: stable across processes, machines and backends.

    Cached: users and items are written and read over and over (a digest is ~1 µs).
    """
    digest = hashlib.blake2b(domain_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & POINT_ID_MASK


def point_ids(domain_ids: Sequence[str]) -> np.ndarray:
    """``point_id`` of each domain id, as an int64 array."""
    return np.fromiter((point_id(i) for i in domain_ids), np.int64, len(domain_ids))


def point_uuid(domain_id: str) -> uuid.UUID:
    """The point id format 1 gave a domain id (before integer ids); for converting old stores."""
    return uuid.uuid5(POINT_ID_NAMESPACE, domain_id)


def check_distinct_points(points: Sequence["Point"]) -> list[int]:
    """Each point's ``point_id``; ``ValueError`` if two different domain ids share one."""
    ids = [point_id(point.id) for point in points]
    if len(set(ids)) != len({point.id for point in points}):
        seen: dict[int, str] = {}
        for pid, point in zip(ids, points):
            other = seen.setdefault(pid, point.id)
            if other != point.id:
                raise ValueError(f"domain ids {other!r} and {point.id!r} map to the same point id {pid}")
    return ids


def check_vector(spec: CollectionSpec, vector_name: str, vector: Any) -> list[float]:
    """A vector as a plain float list, after checking name, shape and values.

    Zero and non-finite vectors are refused: cosine is undefined for them and
    qdrant would store them silently, scoring 0 against everything.
    """
    dim = spec.vectors.get(vector_name)
    if dim is None:
        raise ValueError(
            f"collection {spec.name!r} has no vector {vector_name!r}; "
            f"it has {sorted(spec.vectors)}"
        )
    array = np.asarray(vector, dtype=np.float32)
    if array.shape != (dim,):
        raise ValueError(
            f"vector {vector_name!r} of collection {spec.name!r} must have shape ({dim},), "
            f"got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"vector {vector_name!r} of collection {spec.name!r} is not finite")
    if not float(np.dot(array, array)) > 0.0:
        raise ValueError(
            f"vector {vector_name!r} of collection {spec.name!r} is all zeros; "
            "leave the name out instead"
        )
    return array.tolist()


def check_query_matrix(spec: CollectionSpec, vector_name: str, vectors: Any) -> list[list[float]]:
    """Rows of a (Q, dim) query matrix as float lists, each checked like one vector."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"query vectors must be a (Q, dim) matrix, got shape {matrix.shape}")
    return [check_vector(spec, vector_name, row) for row in matrix]


def check_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a caller's payload; the reserved id key may not be written."""
    if ID_KEY in payload:
        raise ValueError(f"payload key {ID_KEY!r} is reserved for the point's domain id")
    return dict(payload)


def check_limit(limit: int) -> None:
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")


def stored_payload(point: Point) -> dict[str, Any]:
    """The payload as stored: the caller's keys plus the domain id."""
    payload = check_payload(point.payload)
    payload[ID_KEY] = point.id
    return payload


def wanted_vectors(spec: CollectionSpec, with_vectors: WithVectors) -> bool | list[str]:
    """``with_vectors`` as a backend argument, after checking the names."""
    if isinstance(with_vectors, bool):
        return with_vectors
    names = list(with_vectors)
    unknown = [name for name in names if name not in spec.vectors]
    if unknown:
        raise ValueError(
            f"collection {spec.name!r} has no vectors {unknown}; it has {sorted(spec.vectors)}"
        )
    return names


def to_hit(
    payload: Mapping[str, Any] | None,
    score: float,
    vectors: Mapping[str, Any] | None,
) -> Hit:
    """A Hit from a backend record: domain id out of the payload, vectors as float32 arrays."""
    caller_payload = dict(payload or {})
    domain_id = caller_payload.pop(ID_KEY, None)
    if not isinstance(domain_id, str):
        # Only points written through this interface are expected in a collection.
        raise ValueError(f"stored point has no string {ID_KEY!r} in its payload: {payload!r}")
    arrays = {
        name: np.asarray(values, dtype=np.float32)
        for name, values in (vectors or {}).items()
        # Sparse or multi vectors never appear: specs only declare dense ones.
        if values is not None
    }
    return Hit(id=domain_id, score=float(score), payload=caller_payload, vectors=arrays)


def check_same_vectors(spec: CollectionSpec, stored: Mapping[str, int]) -> None:
    """``ConfigError`` unless an existing collection has exactly the spec's vectors."""
    if dict(stored) != spec.vectors:
        raise ConfigError(
            f"collection {spec.name!r} exists with vectors {dict(stored)}, not {spec.vectors}"
        )


def check_same_spec(spec: CollectionSpec, known: CollectionSpec) -> None:
    """``ConfigError`` unless an open collection has the spec's vectors and distances."""
    check_same_vectors(spec, known.vectors)
    if spec.dot != known.dot:
        raise ConfigError(
            f"collection {spec.name!r} is open with dot-product vectors {sorted(known.dot)}, "
            f"not {sorted(spec.dot)}"
        )


def named_vectors(vector: Any) -> Mapping[str, Any] | None:
    """A record's vectors when they came back as name -> values, else None (not asked)."""
    return vector if isinstance(vector, dict) else None


def check_price_bounds(flt: SearchFilter) -> None:
    for bound in (flt.min_price, flt.max_price):
        if bound is not None and not math.isfinite(bound):
            raise ValueError(f"price bounds must be finite, got {bound!r}")
