"""The published contracts (docs/schemas/): generated, valid, and agreeing with the worker.

A client in another language sees only these documents, so besides "the
committed copies are what the code generates" the tests here look at them
from the outside: a JSON Schema validator that is not pydantic (``jsonschema``)
must give the worker's verdict on the same bytes, the README's copy-paste
examples must pass it, and messages of every schema version a worker still
reads (tests/contracts/v*/) must still be accepted.
"""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from core.contracts import MESSAGES, asyncapi_document, json_schemas
from core.errors import DecodeError
from core.events import SCHEMA_VERSION, decode
from core.settings import TOPIC_KEYS, Settings
from stream import contracts
from stream.openapi import openapi_document
from streamrec.cli import main

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "schemas"
README = REPO / "README.md"
VERSIONS = REPO / "tests" / "contracts"
MAX_BYTES = 1 << 20
KINDS = {kind.name: kind for kind in MESSAGES}
KIND_OF_TOPIC = {Settings.model_construct().topic(kind.topic_key): kind.name for kind in MESSAGES}


def validator(kind: str) -> jsonschema.protocols.Validator:
    """The committed JSON Schema of ``kind``, as a client in another language loads it."""
    schema = json.loads((DOCS / "json" / f"{kind}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def worker_accepts(kind: str, raw: bytes) -> bool:
    model: type[BaseModel] = KINDS[kind].model
    try:
        decode(model, raw, max_bytes=MAX_BYTES)
    except DecodeError:
        return False
    return True


# --- generated, never hand-written ------------------------------------------------


def test_committed_documents_are_what_the_code_generates() -> None:
    assert contracts.stale(DOCS) == [], "docs/schemas/ is stale: run `streamrec schema` and commit it"


def test_every_message_kind_and_topic_has_a_document() -> None:
    names = {"click", "search", "image", "catalog_item", "request", "response", "dead_letter", "model_update"}
    assert set(json_schemas()) == names
    assert {kind.topic_key for kind in MESSAGES} == set(TOPIC_KEYS)
    assert sorted(contracts.documents()) == sorted(
        [f"json/{name}.schema.json" for name in names] + ["asyncapi.json", "openapi.json"])


def test_schema_check_command_names_what_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "--out", str(tmp_path)]) == 0
    assert main(["schema", "--check", "--out", str(tmp_path)]) == 0
    click = tmp_path / "json" / "click.schema.json"
    click.write_text(click.read_text().replace('"user_id"', '"userId"'))
    (tmp_path / "json" / "retired.schema.json").write_text("{}")
    (tmp_path / "openapi.json").unlink()
    capsys.readouterr()
    assert main(["schema", "--check", "--out", str(tmp_path)]) == 1
    complaints = capsys.readouterr().err
    for name in ("click.schema.json", "retired.schema.json", "openapi.json"):
        assert name in complaints
    assert main(["schema", "--out", str(tmp_path)]) == 0  # writing repairs all three
    assert contracts.stale(tmp_path) == []


# --- valid documents ------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_3_1() -> None:
    from openapi_spec_validator import validate

    document = json.loads((DOCS / "openapi.json").read_text())
    assert document["openapi"] == "3.1.0"
    validate(document)
    paths = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert paths == {"POST /recommend", "GET /users/{user_id}", "GET /items/{item_id}", "GET /health",
                     "GET /metrics", "GET /openapi.json"}


def test_openapi_error_answers_name_their_reason_codes() -> None:
    responses = openapi_document()["paths"]["/recommend"]["post"]["responses"]
    codes = responses["400"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]["error"]["enum"]
    assert {"bad_json", "unknown_schema_version", "invalid_value", "bad_image"} <= set(codes)
    assert "oversize" not in codes  # 413
    user_404 = openapi_document()["paths"]["/users/{user_id}"]["get"]["responses"]["404"]
    assert "unknown_user" in user_404["content"]["application/json"]["schema"]["allOf"][1]["properties"][
        "error"]["enum"]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [
            ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@pytest.mark.parametrize("name", ["asyncapi.json", "openapi.json"])
def test_every_reference_resolves(name: str) -> None:
    document = json.loads((DOCS / name).read_text())
    refs = _refs(document)
    assert refs
    for ref in refs:
        _resolve(document, ref)


@pytest.mark.filterwarnings('ignore:Field name "schema":UserWarning')  # asyncapi3's own models
def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    from asyncapi3 import AsyncAPI3

    document = json.loads((DOCS / "asyncapi.json").read_text())
    AsyncAPI3.model_validate(document)
    assert document["asyncapi"] == "3.0.0" and document["info"]["version"] == str(SCHEMA_VERSION)
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {Settings.model_construct().topic(key) for key in TOPIC_KEYS}
    for channel in document["channels"].values():
        assert channel["x-publishers"] and channel["x-subscribers"] and "Key:" in channel["description"]
        for message_ref in channel["messages"].values():
            message = _resolve(document, message_ref["$ref"])
            assert message["bindings"]["kafka"]["key"]["type"] == "string"
    actions = {op["action"] for op in document["operations"].values()}
    assert actions == {"send", "receive"}


def test_asyncapi_payloads_are_the_message_schemas() -> None:
    document = asyncapi_document()
    for kind in MESSAGES:
        payload = _resolve(document, document["components"]["messages"][kind.name]["payload"]["$ref"])
        assert payload["properties"].keys() == json_schemas()[kind.name]["properties"].keys()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_json_schema_is_valid_draft_2020_12(kind: str) -> None:
    jsonschema.Draft202012Validator.check_schema(validator(kind).schema)


# --- the same verdict as the worker --------------------------------------------------


def _examples() -> list[tuple[str, dict[str, Any]]]:
    return [(name, example) for name, schema in json_schemas().items() for example in schema.get("examples", [])]


@pytest.mark.parametrize(("kind", "example"), _examples(), ids=lambda value: value if isinstance(value, str) else "")
def test_schema_examples_pass_both_validators(kind: str, example: dict[str, Any]) -> None:
    validator(kind).validate(example)
    assert worker_accepts(kind, json.dumps(example).encode())


def _cases() -> list[tuple[str, dict[str, Any], str]]:
    """(kind, message, what is wrong with it): each one the worker rejects, and so must the schema."""
    click = {"event_id": "e-1", "event_time": 1e9, "user_id": "u-1", "item_id": "i-1"}
    photo = {"event_id": "p-1", "event_time": 1e9, "purpose": "catalog_photo", "item_id": "i-1",
             "image": {"image_uri": "a.jpg"}}
    return [
        ("click", {**click, "schema_version": 2}, "unknown version"),
        ("click", {k: v for k, v in click.items() if k != "item_id"}, "missing field"),
        ("click", {**click, "colour": "red"}, "unknown field"),
        ("click", {**click, "user_id": 42}, "wrong type"),
        ("click", {**click, "user_id": "bad id!"}, "id alphabet"),
        ("click", {**click, "action": "teleport"}, "enum"),
        ("click", {**click, "event_time": 0}, "range"),
        ("click", {**click, "position": 1.5}, "fraction for an integer"),
        ("click", {**click, "position": True}, "boolean for an integer"),
        ("image", {**photo, "image": {"image_uri": "a.jpg", "image_b64": "QUJDRA=="}}, "two image sources"),
        ("image", {**photo, "image": {}}, "no image source"),
        ("image", {**photo, "image": {"image_uri": None, "image_b64": None}}, "two null sources"),
        ("image", {k: v for k, v in photo.items() if k != "item_id"}, "catalog_photo without item_id"),
        ("image", {**photo, "purpose": "visual_search"}, "visual_search without user_id"),
        ("catalog_item", {"event_id": "c", "event_time": 1e9, "item_id": "i", "attributes": {"k" * 101: "v"}},
         "attribute name too long"),
        ("request", {"request_id": "r", "user_id": "u", "k": 0}, "k below 1"),
        ("request", {"request_id": "r", "user_id": "u", "filters": {"max_price": -1}}, "negative price"),
    ]


@pytest.mark.parametrize(("kind", "message", "what"), _cases(), ids=[c[2] for c in _cases()])
def test_what_the_worker_refuses_the_schema_refuses(kind: str, message: dict[str, Any], what: str) -> None:
    assert not worker_accepts(kind, json.dumps(message).encode())
    assert not validator(kind).is_valid(message), f"{what}: the JSON Schema lets it through"


def test_the_documented_differences_are_real() -> None:
    """docs/contracts.md names what a JSON Schema cannot say; if one goes away, the doc must change."""
    click = {"event_id": "e-1", "event_time": 1e9, "user_id": "u-1", "item_id": "i-1"}
    whole_float = {**click, "position": 5.0}
    assert validator("click").is_valid(whole_float) and not worker_accepts("click", json.dumps(whole_float).encode())
    newline = {**click, "user_id": "u-1\n"}
    assert validator("click").is_valid(newline) and not worker_accepts("click", json.dumps(newline).encode())
    # The other way round: the worker reads true as version 1 (Python's True == 1).
    loose = {**click, "schema_version": True}
    assert worker_accepts("click", json.dumps(loose).encode()) and not validator("click").is_valid(loose)


# Values a mutation may put in a field. Whole floats (5.0) and ids ending in a
# newline are left out, and a schema_version of true is skipped: the documented
# differences above.
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 12_000), st.sampled_from([-1.5, 0.25, 1e9 + 0.5, 5e9 + 0.5]),
    st.sampled_from(["", "x", "u-1", "bad id!", "sku:42", "a" * 129, "view", "purchase", "upsert", "delete",
                     "catalog_photo", "visual_search", "QUJDRA==", "file:///x.jpg"]),
    st.just([]), st.just(["a"]), st.just({}), st.just({"image_uri": "a.jpg"}), st.just({"image_b64": "QUJDRA=="}),
).map(lambda value: json.loads(json.dumps(value)))  # a fresh copy: later mutations must not reach the pool


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind, example = draw(st.sampled_from([(k, e) for k, e in _examples() if KINDS[k].mode == "validation"]))
    message = json.loads(json.dumps(example))
    for _ in range(draw(st.integers(1, 3))):
        target = message
        if draw(st.booleans()):  # sometimes one level down (image, filters, attributes)
            nested = [value for value in target.values() if isinstance(value, dict)]
            if nested:
                target = draw(st.sampled_from(nested))
        fields = sorted(target) + ["event_id", "user_id", "item_id", "k", "image", "unknown"]
        field = draw(st.sampled_from(fields))
        if draw(st.integers(0, 4)) == 0:
            target.pop(field, None)
        else:
            target[field] = draw(_VALUES)
    return kind, message


@settings(max_examples=400)
@given(_mutated())
def test_schema_and_worker_agree_on_mutated_messages(case: tuple[str, dict[str, Any]]) -> None:
    kind, message = case
    assume(message.get("schema_version") is not True)
    accepted = worker_accepts(kind, json.dumps(message).encode())
    valid = validator(kind).is_valid(message)
    assert accepted == valid, f"worker {'accepts' if accepted else 'refuses'}, JSON Schema says {valid}: {message}"


# --- every version a worker still reads ---------------------------------------------


def _versioned() -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for folder in sorted(VERSIONS.glob("v*")):
        for path in sorted(folder.glob("*.json")):
            for message in json.loads(path.read_text()):
                found.append((folder.name, path.stem, message))
    return found


def test_the_current_version_has_its_messages() -> None:
    folder = VERSIONS / f"v{SCHEMA_VERSION}"
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(
        kind.name for kind in MESSAGES if kind.mode == "validation")


@pytest.mark.parametrize(("version", "kind", "message"), _versioned(),
                         ids=[f"{v}-{k}-{n}" for n, (v, k, _) in enumerate(_versioned())])
def test_messages_of_every_kept_version_are_still_accepted(version: str, kind: str, message: dict[str, Any]) -> None:
    """No previous version exists yet (1 is the first); v1's messages stay here once 2 exists."""
    assert worker_accepts(kind, json.dumps(message).encode()), f"a {version} {kind} is refused"
    validator(kind).validate(message)


def test_an_unknown_version_is_refused_with_its_reason() -> None:
    click = {"event_id": "e-1", "schema_version": SCHEMA_VERSION + 1, "event_time": 1e9, "user_id": "u", "item_id": "i"}
    with pytest.raises(DecodeError) as caught:
        decode(KINDS["click"].model, json.dumps(click).encode(), max_bytes=MAX_BYTES)
    assert caught.value.reason == "unknown_schema_version"
    assert not validator("click").is_valid(click)


# --- the README's copy-paste examples ----------------------------------------------------


def readme_blocks(marker: str) -> list[tuple[str, str]]:
    """(marker value, fenced block) for each ``<!-- marker: value -->`` in the README."""
    pattern = re.compile(rf"<!-- {marker}: (\w+) -->\n```\w+\n(.*?)```", re.DOTALL)
    return pattern.findall(README.read_text())


def test_readme_json_examples_are_valid() -> None:
    blocks = readme_blocks("schema")
    assert blocks, "no <!-- schema: KIND --> block in the README"
    for kind, text in blocks:
        message = json.loads(text)
        validator(kind).validate(message)
        assert KINDS[kind].model.model_validate_json(text)


class _RecordingProducer:
    """Stands in for confluent_kafka.Producer: keeps what the snippet produces."""

    sent: list[tuple[str, str | bytes | None, str | bytes]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        assert "bootstrap.servers" in config

    def produce(self, topic: str, key: str | bytes | None = None, value: str | bytes = b"") -> None:
        self.sent.append((topic, key, value))

    def flush(self, timeout: float | None = None) -> int:
        return 0


class _AnsweringConsumer:
    """Stands in for confluent_kafka.Consumer: answers the last request produced, as a worker would."""

    def __init__(self, config: dict[str, Any]) -> None:
        assert "group.id" in config

    def subscribe(self, topics: list[str]) -> None:
        assert topics == ["rec.responses"]

    def poll(self, timeout: float) -> Any:
        request = json.loads([value for topic, _, value in _RecordingProducer.sent if topic == "rec.requests"][-1])
        answer = {**json_schemas()["response"]["examples"][0], "request_id": request["request_id"]}
        return types.SimpleNamespace(error=lambda: None, value=lambda: json.dumps(answer).encode())

    def close(self) -> None:
        pass


def test_readme_snippets_send_only_valid_messages(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The snippets run here on stand-ins; tests/integration/test_contracts.py runs them on a broker."""
    fake = types.ModuleType("confluent_kafka")
    fake.Producer, fake.Consumer = _RecordingProducer, _AnsweringConsumer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "confluent_kafka", fake)
    monkeypatch.delenv("STREAMREC_TOPIC_PREFIX", raising=False)
    monkeypatch.setattr(_RecordingProducer, "sent", [])
    snippets = dict(readme_blocks("snippet"))
    assert set(snippets) == {"produce", "consume"}
    for name in ("produce", "consume"):
        exec(compile(snippets[name], f"README.md ({name})", "exec"), {})  # noqa: S102 (our own README)
    topics = [topic for topic, _, _ in _RecordingProducer.sent]
    assert topics == ["catalog.items", "catalog.items", "events.clicks", "rec.requests"]
    for topic, key, value in _RecordingProducer.sent:
        kind = KIND_OF_TOPIC[topic]
        message = json.loads(value)
        validator(kind).validate(message)
        assert worker_accepts(kind, value.encode() if isinstance(value, str) else value)
        assert key == message.get("user_id", message.get("item_id"))  # keyed as the contract says
    printed = json.loads(capsys.readouterr().out)
    validator("response").validate(printed)
