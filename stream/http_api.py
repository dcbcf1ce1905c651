"""The HTTP entry point: POST /recommend, GET /users/{id}, /items/{id}, /health, /metrics, /openapi.json.

Served by the worker process (the embedded vector store lives there), on
``STREAMREC_HTTP_HOST:STREAMREC_HTTP_PORT``. Bodies are size-capped and
validated with the same schema as ``rec.requests``, so both paths rank alike.
Every answer is built from the models in ``stream.openapi``, whose OpenAPI
document is served at ``/openapi.json``; every error is an ``ErrorBody`` with a
reason code, the router's own 404 and 405 included.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from core.errors import DecodeError, StoreUnavailableError
from core.events import RecRequest, decode
from exporter.metrics import merge_expositions
from stream.openapi import (
    ErrorBody,
    Health,
    ItemPayload,
    ItemView,
    UserView,
    openapi_document,
)
from stream.partitions import SINGLE, Ownership
from stream.recommend import UserElsewhere, recommend
from stream.services import Services
from stream.user_table import PeerTables, TableUser

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_as_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's 404/405 and a store outage answered like every other error: an ErrorBody."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _error(404, "not_found", f"no route for {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = sorted(exc.allowed_methods)
        response = _error(405, "method_not_allowed", f"{request.path} takes {', '.join(allowed)}")
        response.headers["Allow"] = ",".join(allowed)
        return response
    except StoreUnavailableError as exc:
        log.warning("HTTP %s %s: %s", request.method, request.path, exc)
        return _error(503, "store_unavailable", str(exc))


FORWARDED = "X-Streamrec-Forwarded"  # a request a peer process passed on: answered here, never passed on again
FORWARD_TIMEOUT_S = 30.0
PEER_HEALTH_TIMEOUT_S = 3.0


class Peers:
    """The other worker processes of this machine, each on its own unix socket.

    A request for a user lands on whichever process the kernel hands the
    connection to (all share the port); the process that owns the user's
    partition holds the user's state, so the others pass the request to it.
    """

    def __init__(self, ownership: Ownership, partitions: int) -> None:
        self.ownership = ownership
        self.partitions = partitions
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        # The users each other process applied, as it applied them last (stream.user_table).
        self.tables = None if ownership.root is None else PeerTables(ownership.root)

    def user(self, index: int, user_id: str) -> TableUser | None:
        """``user_id`` from process ``index``'s shared user table; None where that table does not hold it."""
        return None if self.tables is None else self.tables.read(index, user_id)

    def owner(self, user_id: str) -> int | None:
        """The process that owns ``user_id`` if it is another one, else None."""
        if self.ownership.single or not self.partitions:
            return None
        owner = self.ownership.owner_of(user_id.encode(), self.partitions)
        return None if owner == self.ownership.index else owner

    def session(self, index: int) -> aiohttp.ClientSession:
        if index not in self._sessions:
            connector = aiohttp.UnixConnector(path=self.ownership.socket_address(index))
            self._sessions[index] = aiohttp.ClientSession(connector=connector)
        return self._sessions[index]

    async def forward(self, index: int, request: web.Request, body: bytes | None = None) -> web.Response:
        """``request`` answered by process ``index``, as that process answered it."""
        try:
            async with self.session(index).request(
                request.method, f"http://process-{index}{request.path_qs}", data=body,
                headers={FORWARDED: str(self.ownership.index), "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S),
            ) as reply:
                payload = await reply.read()
                return web.Response(status=reply.status, body=payload,
                                    content_type=reply.content_type or "application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _error(503, "owner_unavailable",
                          f"worker process {index}, which holds this user, did not answer "
                          f"({type(exc).__name__}: {exc}); try again")

    async def health(self) -> dict[int, Health | None]:
        """Each other process's own health (None where it did not answer)."""
        async def read(reply: aiohttp.ClientResponse) -> Health:
            return Health.model_validate_json(await reply.read())

        return await self._ask_each("/health", read)

    async def metrics(self) -> dict[int, str | None]:
        """Each other process's own metrics text (None where it did not answer: being restarted)."""
        async def read(reply: aiohttp.ClientResponse) -> str:
            if reply.status != 200:
                raise ValueError(f"/metrics answered {reply.status}")
            return (await reply.read()).decode()

        return await self._ask_each("/metrics", read)

    async def _ask_each(self, path: str, read: Callable[[aiohttp.ClientResponse], Awaitable[T]]) -> dict[int, T | None]:
        async def one(index: int) -> T | None:
            try:
                async with self.session(index).get(
                    f"http://process-{index}{path}", headers={FORWARDED: str(self.ownership.index)},
                    timeout=aiohttp.ClientTimeout(total=PEER_HEALTH_TIMEOUT_S),
                ) as reply:
                    return await read(reply)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("worker process %d did not answer %s: %s", index, path, exc)
                return None

        others = [i for i in range(self.ownership.count) if i != self.ownership.index]
        return dict(zip(others, await asyncio.gather(*(one(i) for i in others))))

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        if self.tables is not None:
            self.tables.close()


def build_http_app(services: Services, health: "HealthState", peers: Peers | None = None) -> web.Application:
    settings = services.settings
    app = web.Application(client_max_size=settings.http_max_body_bytes, middlewares=[errors_as_bodies])
    openapi = json.dumps(openapi_document(), indent=2).encode()
    peers = peers or Peers(SINGLE, 0)

    def owner(request: web.Request, user_id: str) -> int | None:
        return None if FORWARDED in request.headers else peers.owner(user_id)

    async def post_recommend(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "oversize", f"body exceeds {settings.http_max_body_bytes} bytes")
        try:
            rec_request = decode(RecRequest, body, max_bytes=settings.http_max_body_bytes)
        except DecodeError as exc:
            services.metrics.requests_failed.labels("http").inc()
            return _error(413 if exc.reason == "oversize" else 400, exc.reason, exc.detail)
        holder = owner(request, rec_request.user_id)
        known = None
        if holder is not None:
            # Answered here from the owner's shared user table where it holds the user, else by the owner.
            known = peers.user(holder, rec_request.user_id)
            if known is None:
                services.metrics.peer_user_requests.labels("passed_on").inc()
                return await peers.forward(holder, request, body)
        image_vector = None
        if rec_request.image is not None:
            from stream.catalog import embed_query_image

            try:
                # The image tower releases the GIL and takes tens of ms: off the event loop.
                image_vector = await asyncio.to_thread(embed_query_image, services, rec_request.image)
            except DecodeError as exc:
                return _error(400, exc.reason, exc.detail)
        try:
            response = await services.answer(recommend, services, rec_request, path="http",
                                             image_vector=image_vector, user=known)
        except UserElsewhere:  # the owner applied the user under another model version (a swap under way)
            assert holder is not None
            services.metrics.peer_user_requests.labels("passed_on").inc()
            return await peers.forward(holder, request, body)
        if known is not None:
            services.metrics.peer_user_requests.labels("here").inc()
        return web.Response(body=response.to_bytes(), content_type="application/json")

    async def get_health(request: web.Request) -> web.Response:
        status = health.snapshot()
        if not peers.ownership.single and FORWARDED not in request.headers:
            status = _together(peers.ownership.index, status, await peers.health())
        return _json(status, 200 if status.healthy else 503)

    async def get_metrics(request: web.Request) -> web.Response:
        own = generate_latest(services.metrics.registry)
        if not peers.ownership.single and FORWARDED not in request.headers:
            # On the shared port: every process's series, so that one scrape target
            # sees the whole worker whichever process takes the connection.
            texts = {index: text for index, text in (await peers.metrics()).items() if text is not None}
            own = merge_expositions({peers.ownership.index: own.decode(), **texts})
        return web.Response(body=own, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_user(request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        holder = owner(request, user_id)
        if holder is not None:
            return await peers.forward(holder, request)
        serving = services.serving  # one version for the whole answer
        hits = await asyncio.to_thread(services.store.retrieve, serving.collections.users, [user_id], ["user"])
        if user_id not in hits:
            return _error(404, "unknown_user", f"no state for user {user_id!r}")
        payload, vector = hits[user_id].payload, hits[user_id].vectors.get("user")
        return _json(UserView(user_id=user_id, items=payload.get("items", []),
                              # The user's embedding in the serving model's space (null while cold).
                              model_version=serving.model.version,
                              vector=None if vector is None else [float(x) for x in vector],
                              actions=payload.get("actions", []),
                              last_event_time=payload.get("last_event_time"),
                              # Where this user's state stands in each topic/partition,
                              # so clients can wait for their own writes.
                              applied=payload.get("applied", {}),
                              applied_count=payload.get("applied_count", 0)))

    async def get_item(request: web.Request) -> web.Response:
        item_id = request.match_info["item_id"]
        hits = await asyncio.to_thread(services.store.retrieve, services.collections.items, [item_id], ["fused", "text", "image"])
        if item_id not in hits:
            return _error(404, "unknown_item", f"no item {item_id!r}")
        hit = hits[item_id]
        view = ItemView(item_id=item_id, payload=ItemPayload.model_validate(hit.payload), vectors=sorted(hit.vectors))
        return _json(view, exclude_unset=True)  # the payload as stored: no defaults filled in

    async def get_openapi(_: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    app.router.add_post("/recommend", post_recommend)
    app.router.add_get("/users/{user_id}", get_user)
    app.router.add_get("/items/{item_id}", get_item)
    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/openapi.json", get_openapi)
    return app


def _json(body: BaseModel, status: int = 200, *, exclude_unset: bool = False) -> web.Response:
    return web.Response(status=status, body=body.model_dump_json(exclude_unset=exclude_unset).encode(),
                        content_type="application/json")


def _error(status: int, reason: str, detail: str) -> web.Response:
    return _json(ErrorBody(error=reason, detail=detail), status)


class HealthState:
    """Whether the worker can reach its broker and store, as /health and a gauge report it."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self.broker_ok = False
        self.store_ok = False
        self.checked_at = 0.0
        self.detail = "starting"
        self.ready = False  # the agents hold their partitions

    def update(self, *, broker_ok: bool, store_ok: bool, ready: bool, detail: str) -> None:
        self.broker_ok, self.store_ok, self.ready, self.detail = broker_ok, store_ok, ready, detail
        self.checked_at = time.time()
        self._services.metrics.healthy.set(1 if broker_ok and store_ok else 0)

    def snapshot(self) -> Health:
        return Health(
            healthy=self.broker_ok and self.store_ok,
            broker=self.broker_ok,
            store=self.store_ok,
            ready=self.ready,
            model_version=self._services.model.version,
            checked_at=self.checked_at,
            detail=self.detail,
        )


def _together(index: int, own: Health, peers: dict[int, Health | None]) -> Health:
    """One process's health with its peers': healthy and ready only when every process is."""
    statuses = {index: own, **peers}
    problems = [f"process {i}: unreachable" if s is None else f"process {i}: {s.detail}"
                for i, s in sorted(statuses.items()) if s is None or not (s.healthy and s.ready)]
    every = [s for s in statuses.values() if s is not None]
    complete = len(every) == len(statuses)
    return Health(
        healthy=complete and all(s.healthy for s in every),
        broker=complete and all(s.broker for s in every),
        store=complete and all(s.store for s in every),
        ready=complete and all(s.ready for s in every),
        model_version=own.model_version,
        checked_at=own.checked_at,
        detail="; ".join(problems) or "ok",
    )


async def serve_http(services: Services, health: HealthState, ownership: Ownership = SINGLE,
                     partitions: int = 0) -> web.AppRunner:
    """Serve on the configured port; with N processes every one listens on it (SO_REUSEPORT) and
    also on its own unix socket, where its peers pass on the requests of the users it owns."""
    peers = Peers(ownership, partitions)
    app = build_http_app(services, health, peers)
    app.on_cleanup.append(lambda _: peers.close())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    settings = services.settings
    site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_port=not ownership.single)
    await site.start()
    if not ownership.single:
        await web.UnixSite(runner, ownership.socket_address()).start()
    return runner
