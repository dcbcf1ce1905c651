"""The HTTP contract: the bodies the endpoint answers with, and its OpenAPI 3.1 document.

``stream.http_api`` builds every answer from these models and serves
``openapi_document()`` at ``GET /openapi.json``, so the document describes what
the handlers send; request and response of ``POST /recommend`` are the
``rec.requests`` / ``rec.responses`` schemas of ``core.events``. Nothing here
needs Kafka or the store: ``streamrec schema`` imports it to write the
committed copy (docs/schemas/openapi.json).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from core.events import REASONS, SCHEMA_VERSION, RecRequest, RecResponse
from model.serving.contract import ACTIONS

# The reason codes each error status carries in its body's ``error`` field.
RECOMMEND_REJECTED = tuple(r for r in REASONS if r not in ("oversize", "unknown_item", "processing_error"))
HTTP_ERRORS: dict[str, tuple[str, ...]] = {
    "bad_request": RECOMMEND_REJECTED,
    "oversize": ("oversize",),
    # not_found: the id never reached the worker as one path segment ("." and
    # ".." are valid ids that most HTTP clients remove from a path).
    "unknown_user": ("unknown_user", "not_found"),
    "unknown_item": ("unknown_item", "not_found"),
    "not_found": ("not_found",),
    "method_not_allowed": ("method_not_allowed",),
    "unavailable": ("store_unavailable",),
}


class ErrorBody(BaseModel):
    """Every error answer: a reason code for programs and a detail for people."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error: str = Field(description="Reason code (the same codes as dead letters where the cause is the same).")
    detail: str = Field(description="What was wrong, for people.")


class Health(BaseModel):
    """Whether the worker reaches its broker and store, and holds its partitions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    healthy: bool = Field(description="Broker and store both reachable (the HTTP status is 503 when not).")
    broker: bool
    store: bool
    ready: bool = Field(description="The agents hold their partitions: events and requests are being served.")
    model_version: str = Field(description="The serving model.")
    checked_at: float = Field(description="Last check: seconds since the Unix epoch (0 before the first).")
    detail: str = Field(description='"ok", "starting", or what failed.')


class UserView(BaseModel):
    """A user's state as the worker holds it (``GET /users/{user_id}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: str
    items: list[str] = Field(description='The recent sequence, oldest first; searches appear as "q:<id>".')
    model_version: str = Field(description="The model whose space `vector` is in.")
    vector: list[float] | None = Field(description="The user's embedding; null while the user is cold.")
    actions: list[int] = Field(description="The action code of each entry of `items`: " + ", ".join(
        f"{code} {name}" for code, name in enumerate(ACTIONS) if code))
    last_event_time: float | None = Field(description="Event time of the latest applied event.")
    applied: dict[str, int] = Field(
        description='"topic/partition" -> the last offset applied there, so a client can wait for its own writes.')
    applied_count: int = Field(description="Events applied for this user.")


class ItemPayload(BaseModel):
    """What the store keeps for an item; more keys may appear (a client should ignore them)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    title: str = ""
    category: str = ""
    description: str = ""
    price: float | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    created_at: float | None = Field(None, description="event_time of the catalogue event that listed it.")
    has_image: bool = False
    image_uri: str | None = None


class ItemView(BaseModel):
    """An item as the store holds it (``GET /items/{item_id}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str
    payload: ItemPayload
    vectors: list[str] = Field(description='The named vectors it has: "fused", "text", "image".')


_MODELS: list[tuple[type[BaseModel], str]] = [
    (RecRequest, "validation"),
    (RecResponse, "serialization"),
    (ErrorBody, "serialization"),
    (Health, "serialization"),
    (UserView, "serialization"),
    (ItemView, "serialization"),
]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(names: dict[type[BaseModel], str], kind: str, description: str) -> dict[str, Any]:
    codes = HTTP_ERRORS[kind]
    schema = {"allOf": [{"$ref": f"#/components/schemas/{names[ErrorBody]}"},
                        {"properties": {"error": {"enum": list(codes)}}}]}
    return _json(schema, f"{description} `error` is one of: {', '.join(codes)}.")


def _id_parameter(name: str, what: str) -> dict[str, Any]:
    id_schema = RecRequest.model_json_schema()["properties"]["user_id"]
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": f"The {what} id, as its events carry it (percent-encode a '/').",
        "schema": {key: id_schema[key] for key in ("type", "minLength", "maxLength", "pattern")},
        "example": "u-1" if what == "user" else "sku-1",
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the worker's HTTP endpoint."""
    refs, definitions = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")
    names = {model: refs[(model, mode)]["$ref"].rpartition("/")[2] for model, mode in _MODELS}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{names[model]}"}

    not_found = _error(names, "not_found", "No such path.")
    method_not_allowed = {
        **_error(names, "method_not_allowed", "The path takes other methods."),
        "headers": {"Allow": {"description": "The methods the path takes.", "schema": {"type": "string"}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streamrec HTTP endpoint",
            "version": str(SCHEMA_VERSION),
            "description": (
                "Served by every streamrec worker on STREAMREC_HTTP_HOST:STREAMREC_HTTP_PORT. POST /recommend "
                "takes the body of a rec.requests message and answers with the body of a rec.responses "
                "message: HTTP and Kafka rank alike. Every error answer is an ErrorBody with a reason "
                "code. Integers are JSON integers (5, not 5.0). Compatibility rules: docs/contracts.md."
            ),
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "a worker with the default settings"}],
        "paths": {
            "/recommend": {
                "post": {
                    "operationId": "recommend",
                    "summary": "Recommendations for a user (plain, search or visual search)",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": ref(RecRequest)}}},
                    "responses": {
                        "200": _json(ref(RecResponse), "The ranked items, best first."),
                        "400": _error(names, "bad_request",
                                      "The body is not a valid request, or its image cannot be used."),
                        "413": _error(names, "oversize", "The body exceeds STREAMREC_HTTP_MAX_BODY_BYTES."),
                        "503": _error(names, "unavailable", "The vector store cannot be reached; retry."),
                    },
                },
            },
            "/users/{user_id}": {
                "get": {
                    "operationId": "getUser",
                    "summary": "A user's state: recent sequence, applied offsets, vector",
                    "parameters": [_id_parameter("user_id", "user")],
                    "responses": {
                        "200": _json(ref(UserView), "The user's state."),
                        "404": _error(names, "unknown_user", "The worker holds no state for this user, or the id "
                                      "did not arrive as one path segment (most clients drop '.' and '..')."),
                        "503": _error(names, "unavailable", "The vector store cannot be reached; retry."),
                    },
                },
            },
            "/items/{item_id}": {
                "get": {
                    "operationId": "getItem",
                    "summary": "An item's stored payload and which vectors it has",
                    "parameters": [_id_parameter("item_id", "item")],
                    "responses": {
                        "200": _json(ref(ItemView), "The item."),
                        "404": _error(names, "unknown_item", "No such item in the catalogue, or the id did not "
                                      "arrive as one path segment (most clients drop '.' and '..')."),
                        "503": _error(names, "unavailable", "The vector store cannot be reached; retry."),
                    },
                },
            },
            "/health": {
                "get": {
                    "operationId": "getHealth",
                    "summary": "Liveness and readiness",
                    "responses": {
                        "200": _json(ref(Health), "Broker and store reachable."),
                        "503": _json(ref(Health), "Broker or store unreachable (see detail)."),
                    },
                },
            },
            "/metrics": {
                "get": {
                    "operationId": "getMetrics",
                    "summary": "Prometheus metrics (docs/observability.md)",
                    "responses": {
                        "200": {
                            "description": "The Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                    },
                },
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenAPI",
                    "summary": "This document",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {
                            "type": "object"}}}},
                    },
                },
            },
        },
        "components": {
            "schemas": definitions.get("$defs", {}),
            "responses": {"NotFound": not_found, "MethodNotAllowed": method_not_allowed},
        },
    }
