"""The contracts from the outside, against a live worker: nothing here imports the worker's schemas.

- schemathesis, a separate program, reads the worker's own ``/openapi.json``
  and fuzzes every operation: each answer must be a 2xx or a documented 4xx
  whose body matches the documented error schema, never a 5xx or a hang.
- A librdkafka client (confluent-kafka) produces and consumes as a Java or Go
  service would, and what the worker writes on ``rec.responses`` and
  ``events.deadletter`` is validated with ``jsonschema`` against the committed
  JSON Schemas.
- The README's confluent-kafka snippets run as they are, as separate processes.

One worker serves the module (its start is most of the cost); each test uses
ids of its own.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bench.stack import LocalStack, free_port
from core.settings import Settings, load_settings
from stream.broker import EmbeddedBroker
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "schemas"
FUZZ_EXAMPLES = 100  # per operation and phase: ~1,000-2,000 cases, well under a minute
FUZZ_TIMEOUT_S = 240  # a hang fails the test instead of stalling the suite


@pytest.fixture(scope="module")
def live(broker: EmbeddedBroker, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:8]
    folder = tmp_path_factory.mktemp("contracts")
    settings = load_settings(
        bootstrap_servers=broker.bootstrap,
        topic_prefix=f"t{tag}.",
        app_id=f"streamrec-test-{tag}",
        data_dir=folder / "data",
        model_dir=models_dir,
        http_port=free_port(),
        partitions=2,
        batch_within_s=0.002,
    )
    with LocalStack(settings, log_dir=folder / "logs", start_broker=False):
        yield settings


def validator(kind: str) -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(json.loads((DOCS / "json" / f"{kind}.schema.json").read_text()))


def http_get(settings: Settings, path: str) -> tuple[int, Any]:
    url = f"http://{settings.http_host}:{settings.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def client_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "STREAMREC_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "STREAMREC_TOPIC_PREFIX": settings.topic_prefix}


def readme_snippet(name: str) -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", text, re.DOTALL)
    assert found, f"no <!-- snippet: {name} --> block in the README"
    return found.group(1)


def run_snippet(settings: Settings, name: str) -> str:
    done = subprocess.run([sys.executable, "-c", readme_snippet(name)], env=client_env(settings),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"README snippet {name!r} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def consume(settings: Settings, topics: list[str], until: Any, timeout_s: float = 60) -> list[tuple[str, bytes]]:
    """(topic, value) of everything on ``topics`` from the start, until ``until(messages)`` holds."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"contracts-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([settings.topic(topic) for topic in topics])
    messages: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(messages):
            assert time.monotonic() < deadline, f"timed out reading {topics}: got {messages}"
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                messages.append((message.topic(), message.value()))
    finally:
        consumer.close()
    return messages


# --- librdkafka, produced and consumed as another ecosystem would ------------------------


def test_librdkafka_round_trip_and_the_worker_writes_what_its_schemas_say(live: Settings) -> None:
    from confluent_kafka import Producer, libversion

    settings = live
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    delivered: list[Any] = []

    def publish(topic: str, key: str, value: bytes) -> None:
        producer.produce(settings.topic(topic), key=key, value=value,
                         on_delivery=lambda error, _: delivered.append(error))
        assert producer.flush(10) == 0 and delivered[-1] is None, f"not delivered: {delivered[-1]}"

    now = time.time()
    items = {"rt-shoe": ("Trail running shoe", "Shoes"), "rt-socks": ("Trail socks", "Socks")}
    for item_id, (title, category) in items.items():
        publish("catalog", item_id, json.dumps({"event_id": f"c-{item_id}", "schema_version": 1, "event_time": now,
                                                "item_id": item_id, "title": title, "category": category}).encode())
    wait_until(lambda: all(http_get(settings, f"/items/{i}")[0] == 200 for i in items), 120, "catalogue items stored")
    publish("clicks", "rt-user", json.dumps({"event_id": "rt-click", "schema_version": 1, "event_time": now,
                                             "user_id": "rt-user", "item_id": "rt-shoe"}).encode())
    wait_until(lambda: (http_get(settings, "/users/rt-user")[1].get("vector") is not None), 120, "the click applied")
    garbage = b'{"event_id": "rt-garbage", '
    garbage_b64 = base64.b64encode(garbage).decode()
    publish("clicks", "rt-user", garbage)
    request_id = uuid.uuid4().hex
    publish("requests", "rt-user", json.dumps({"request_id": request_id, "schema_version": 1,
                                               "user_id": "rt-user", "k": 3}).encode())

    def complete(messages: list[tuple[str, bytes]]) -> bool:
        values = [json.loads(value) for _, value in messages]
        return (any(v.get("request_id") == request_id for v in values)
                and any(v.get("raw_b64") == garbage_b64 for v in values))

    messages = consume(settings, ["responses", "deadletter"], complete)
    kinds = {settings.topic("responses"): "response", settings.topic("deadletter"): "dead_letter"}
    for topic, value in messages:  # every message the worker wrote there, not only ours
        validator(kinds[topic]).validate(json.loads(value))
    response = next(json.loads(v) for _, v in messages if json.loads(v).get("request_id") == request_id)
    assert response["user_id"] == "rt-user"
    explained = {(item["title"], item["reason"]) for item in response["items"]}
    assert ("Trail socks", "because you viewed 'Trail running shoe'") in explained, response
    letter = next(json.loads(v) for _, v in messages if json.loads(v).get("raw_b64") == garbage_b64)
    assert letter["reason"] == "bad_json" and letter["source_topic"] == settings.topic("clicks")
    assert base64.b64decode(letter["key_b64"]) == b"rt-user"
    print(f"librdkafka {libversion()[0]}: {len(messages)} messages validated against the JSON Schemas")


def test_readme_snippets_run_against_the_embedded_broker(live: Settings) -> None:
    settings = live
    run_snippet(settings, "produce")
    # The item and the click travel on different topics, applied by different consumers.
    wait_until(lambda: http_get(settings, "/users/u-1")[0] == 200 and http_get(settings, "/items/sku-9")[0] == 200,
               120, "the README's item and click applied")
    assert http_get(settings, "/items/sku-9")[1]["payload"]["title"] == "Trail socks"
    printed = run_snippet(settings, "consume")
    response = json.loads(printed)
    validator("response").validate(response)
    assert response["user_id"] == "u-1" and response["items"]


# --- schemathesis against the live worker's /openapi.json ---------------------------------


def test_http_endpoint_survives_schemathesis(live: Settings, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    settings = live
    status, served = http_get(settings, "/openapi.json")
    assert status == 200 and served == json.loads((DOCS / "openapi.json").read_text())
    status, body = http_get(settings, "/no/such/path")  # outside the document, an ErrorBody all the same
    assert (status, body["error"]) == (404, "not_found")
    # Every documented operation with something to find: u-1 and sku-1 (the OpenAPI
    # examples) exist, as a README producer leaves them.
    run_snippet(settings, "produce")
    # The item and the click travel on different topics, applied by different consumers.
    wait_until(lambda: http_get(settings, "/users/u-1")[0] == 200 and http_get(settings, "/items/sku-9")[0] == 200,
               120, "the README's item and click applied")

    report = tmp_path / "schemathesis.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "run",
        f"http://{settings.http_host}:{settings.http_port}/openapi.json",
        "--max-examples", str(FUZZ_EXAMPLES),
        "--workers", "1",
        "--request-timeout", "10",
        # Every check but those about auth (there is none) and positive_data_acceptance:
        # a request valid by the schema may still be refused with a documented 4xx
        # (an image that is not one, a URI outside the image root).
        "--checks", "all",
        "--exclude-checks", "ignored_auth,object_level_authorization,positive_data_acceptance",
        "--generation-database", "none",
        "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"schemathesis still running after {FUZZ_TIMEOUT_S}s (a hang?):\n{str(expired.stdout)[-3000:]}")
    elapsed = time.monotonic() - started
    result = json.loads(report.read_text())
    cases = result["test_cases"]
    seed = re.search(r"Seed: (\d+)", done.stdout)
    with capsys.disabled():
        print(f"\nschemathesis {result['schemathesis_version']}: {cases['generated']} cases on "
              f"{result['operations']['tested']} operations, {cases['with_failures']} with failures, "
              f"{len(result['errors'])} errors, in {elapsed:.1f}s (seed {seed.group(1) if seed else '?'})")
    assert done.returncode == 0 and cases["with_failures"] == 0 and not result["errors"], done.stdout[-6000:]
    assert result["operations"]["tested"] == result["operations"]["total"] >= 5
    assert cases["generated"] >= 5 * FUZZ_EXAMPLES // 2, "fewer cases than asked for"
