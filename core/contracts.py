"""The topics' contract for clients in any language: JSON Schema per message, one AsyncAPI 3 document.

Generated from the pydantic models in ``core.events`` (the schemas the worker
validates with), never written by hand: a field's type, bounds, description and
the cross-field rules come from there. ``MESSAGES`` adds what the models do not
say: the topic, the key, who publishes and who reads. ``streamrec schema``
writes the documents under docs/schemas/; a test fails when the committed ones
differ from these. Versioning rules: docs/contracts.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from core.events import (
    SCHEMA_VERSION,
    CatalogItem,
    ClickEvent,
    DeadLetter,
    ImageEvent,
    ModelUpdate,
    RecRequest,
    RecResponse,
    SearchEvent,
)
from core.settings import Settings

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
KAFKA_BINDING_VERSION = "0.5.0"
PRODUCERS = "producers (shops, apps, importers)"


@dataclass(frozen=True)
class MessageKind:
    """One kind of message on one topic, and the parties on either side of it."""

    name: str  # file stem and AsyncAPI message name, e.g. "click"
    model: type[BaseModel]
    topic_key: str  # a key of ``Settings.topic``
    key: str  # what the Kafka message key holds
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    # "validation": the worker validates it, so the schema is what it accepts;
    # "serialization": streamrec writes it, so the schema is what it sends.
    mode: Literal["validation", "serialization"]
    worker_reads: bool  # the worker's AsyncAPI operation: receive (True) or send

    @property
    def operation(self) -> str:
        return f"{'receive' if self.worker_reads else 'send'}_{self.name}"


WORKER = "streamrec worker"
MESSAGES: tuple[MessageKind, ...] = (
    MessageKind("click", ClickEvent, "clicks", "the user id", (PRODUCERS,),
                (f"{WORKER} (clicks consumer, group <app_id>.clicks)",), "validation", True),
    MessageKind("search", SearchEvent, "searches", "the user id", (PRODUCERS,),
                (f"{WORKER} (searches agent, group <app_id>); with k set it answers on rec.responses",),
                "validation", True),
    MessageKind("image", ImageEvent, "images", "the item id for a catalog_photo, the user id for a visual_search",
                (PRODUCERS,),
                (f"{WORKER} (images agent, group <app_id>); a visual_search with k is answered on rec.responses",),
                "validation", True),
    MessageKind("catalog_item", CatalogItem, "catalog", "the item id", (PRODUCERS,),
                (f"{WORKER} (catalogue agent, group <app_id>)",), "validation", True),
    MessageKind("request", RecRequest, "requests", "the user id", ("clients that want recommendations",),
                (f"{WORKER} (requests consumer, group <app_id>.requests)",), "validation", True),
    MessageKind("response", RecResponse, "responses", "the user id",
                (f"{WORKER} (answers to requests, searches with k and visual searches with k)",),
                ("downstream services, matching request_id",), "serialization", False),
    MessageKind("dead_letter", DeadLetter, "deadletter", "the bad message's own key (none when it had none)",
                (f"{WORKER} (every agent)",), ("operators, alerting, replay tools",), "serialization", False),
    # Written by the jobs, read by every worker as a trigger to check the registry.
    MessageKind("model_update", ModelUpdate, "model_updates", 'the constant "model"',
                ("streamrec finetune (on promotion)", "streamrec model promote | rollback"),
                (f"every {WORKER} (no consumer group: each sees every update)",), "serialization", True),
)


def contract_settings() -> Settings:
    """The defaults, not this machine's environment: the committed documents must not depend on it."""
    return Settings.model_construct()


def message_schema(kind: MessageKind) -> dict[str, Any]:
    """A self-contained JSON Schema (draft 2020-12) for one message kind."""
    schema = kind.model.model_json_schema(mode=kind.mode)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": f"urn:streamrec:{kind.name}:v{SCHEMA_VERSION}", **schema}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Message kind name -> its JSON Schema."""
    return {kind.name: message_schema(kind) for kind in MESSAGES}


def _component_schemas() -> tuple[dict[str, str], dict[str, Any]]:
    """(kind name -> component schema name, every schema under components/schemas)."""
    refs, definitions = models_json_schema(
        [(kind.model, kind.mode) for kind in MESSAGES], ref_template="#/components/schemas/{model}"
    )
    names = {kind.name: refs[(kind.model, kind.mode)]["$ref"].rpartition("/")[2] for kind in MESSAGES}
    return names, definitions.get("$defs", {})


def asyncapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic, from the worker's side.

    Operations are the worker's: it *receives* what producers and clients
    publish and *sends* responses and dead letters. Each channel also names
    its publishers and subscribers (``x-publishers``, ``x-subscribers``).
    """
    settings = settings or contract_settings()
    schema_names, schemas = _component_schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for kind in MESSAGES:
        channel = kind.topic_key
        address = settings.topic(kind.topic_key)
        messages[kind.name] = {
            "name": kind.name,
            "title": kind.model.__name__,
            "summary": (kind.model.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{schema_names[kind.name]}"},
            "bindings": {"kafka": {"key": {"type": "string", "description": f"UTF-8: {kind.key}"},
                                   "bindingVersion": KAFKA_BINDING_VERSION}},
            "examples": [{"payload": example}
                         for example in (kind.model.model_config.get("json_schema_extra") or {}).get("examples", [])],
        }
        channels[channel] = {
            "address": address,
            "title": address,
            "description": (f"Key: {kind.key}. Published by: {'; '.join(kind.publishers)}. "
                            f"Read by: {'; '.join(kind.subscribers)}."),
            "messages": {kind.name: {"$ref": f"#/components/messages/{kind.name}"}},
            "bindings": {"kafka": {"topic": address, "partitions": settings.partitions,
                                   "replicas": settings.replication_factor,
                                   "bindingVersion": KAFKA_BINDING_VERSION}},
            "x-publishers": list(kind.publishers),
            "x-subscribers": list(kind.subscribers),
        }
        operations[kind.operation] = {
            "action": "receive" if kind.worker_reads else "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": f"The worker {'reads' if kind.worker_reads else 'writes'} {address}.",
            "messages": [{"$ref": f"#/channels/{channel}/messages/{kind.name}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "id": "urn:streamrec",
        "info": {
            "title": "streamrec topics",
            "version": str(SCHEMA_VERSION),
            "description": (
                "The Kafka topics of streamrec, a streaming recommender. Every message is a UTF-8 JSON "
                "object; info.version is the messages' schema_version. Topic names get "
                "STREAMREC_TOPIC_PREFIX in front. A message the worker cannot use goes to "
                "events.deadletter with a reason code. Integers are JSON integers (5, not 5.0). "
                "Compatibility rules: docs/contracts.md."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": settings.bootstrap_servers,
                "protocol": "kafka",
                "description": ("The embedded broker (`streamrec broker`, tansu). Clients built on "
                                "librdkafka need librdkafka 2.2 or later (README)."),
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
