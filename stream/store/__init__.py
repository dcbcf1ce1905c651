"""Vector store: one interface (``VectorStore``), two backends, chosen by ``open_store``.

``edge`` runs Qdrant's engine in-process on a directory (the embedded
default); ``qdrant`` talks to a Qdrant server through ``qdrant_client``, or
runs the client's exact, index-less local mode when given ``location``.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError
from stream.store.base import (
    POINT_ID_NAMESPACE,
    QUANTIZATIONS,
    CollectionSpec,
    Hit,
    Point,
    SearchFilter,
    VectorStore,
    int8_vectors,
    point_id,
    point_ids,
    point_uuid,
)

BACKENDS = ("edge", "qdrant")

__all__ = [
    "BACKENDS",
    "POINT_ID_NAMESPACE",
    "QUANTIZATIONS",
    "CollectionSpec",
    "Hit",
    "Point",
    "SearchFilter",
    "VectorStore",
    "int8_vectors",
    "open_store",
    "point_id",
    "point_ids",
    "point_uuid",
]


def open_store(
    backend: str,
    *,
    data_dir: Path | None = None,
    url: str | None = None,
    api_key: str | None = None,
    hnsw_ef: int = 256,
    location: str | None = None,
    quantization: str = "auto",
) -> VectorStore:
    """Open a store; ``ConfigError`` for a bad combination, ``StoreUnavailableError`` if down.

    - ``edge``: needs ``data_dir`` (created if missing).
    - ``qdrant``: needs ``url`` (a server, with optional ``api_key``) or
      ``location`` (``":memory:"`` for tests); not both.

    ``quantization`` (``auto``, ``int8`` or ``none``) is how collections created
    from now on keep the vectors their specs name in ``quantized``
    (``CollectionSpec``, ``int8_vectors``).
    """
    # Imported here so a deployment of one backend does not load the other.
    if backend == "edge":
        if data_dir is None:
            raise ConfigError("the edge vector store needs data_dir")
        from stream.store.edge import EdgeStore

        return EdgeStore(Path(data_dir), hnsw_ef=hnsw_ef, quantization=quantization)
    if backend == "qdrant":
        if (url is None) == (location is None):
            raise ConfigError("the qdrant vector store needs exactly one of url or location")
        from qdrant_client import QdrantClient

        from stream.store.remote import RemoteStore

        client = (
            QdrantClient(url=url, api_key=api_key)
            if url is not None
            else QdrantClient(location=location)
        )
        return RemoteStore(client, hnsw_ef=hnsw_ef, quantization=quantization)
    raise ConfigError(f"unknown vector store backend {backend!r}; choose one of {BACKENDS}")
