"""``streamrec demo``: MovieLens-100k through the embedded stack, end to end.

Starts the embedded broker and a worker (with the in-process Qdrant engine),
publishes the catalogue and the ratings as events in time order, then shows
for a few users their recommendations before and after a burst of new clicks,
the request latencies over Kafka and HTTP, and how to publish your own events.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

from tqdm import tqdm

from bench import movielens
from bench.stack import LocalStack
from core.errors import StreamrecError
from core.events import CatalogItem, ClickEvent, ImageRef, RecRequest, RecResponse
from core.settings import Settings
from stream.client import EventPublisher, ResponseListener, http_recommend

BURST_GENRE = "Sci-Fi"
SHOW_USERS = 3
LATENCY_REQUESTS = 200


def run_demo(settings: Settings, *, users: int, events: int) -> int:
    demo_dir = settings.data_dir / "demo"
    shutil.rmtree(demo_dir / "store", ignore_errors=True)
    # The demo keeps its store apart from a real deployment's, and shares the models.
    settings = settings.model_copy(update={"data_dir": demo_dir, "model_dir": settings.models_path})
    started = time.perf_counter()
    print(f"[1/6] starting the embedded broker and a worker (logs in {demo_dir / 'logs'}) ...", flush=True)
    with LocalStack(settings, log_dir=demo_dir / "logs") as stack:
        print(f"      ready in {time.perf_counter() - started:.1f}s "
              f"(broker {settings.bootstrap_servers}, HTTP http://{settings.http_host}:{settings.http_port})")
        asyncio.run(_replay_and_show(settings, stack, users=users, max_events=events))
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s")
    return 0


async def _wait_processed(stack: LocalStack, topic: str, target: float, timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    done = 0.0
    while time.monotonic() < deadline:
        done = stack.worker.metric("streamrec_events_processed_total", {"topic": topic}) + \
            stack.worker.metric("streamrec_deadletter_total")
        if done >= target:
            return done
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{topic}: {done} of {target} events applied after {timeout_s}s")


async def _ask(listener: ResponseListener, publisher: EventPublisher, request: RecRequest) -> tuple[RecResponse, float]:
    sent = time.perf_counter()
    waiter = listener.expect(request.request_id)
    await publisher.publish(request)
    response = await asyncio.wait_for(waiter, 10)
    return response, (time.perf_counter() - sent) * 1000


def _show(title: str, response: RecResponse, n: int = 5) -> None:
    print(f"    {title}  (model {response.model_version}, served in {response.latency_ms:.1f} ms)")
    for rank, item in enumerate(response.items[:n], 1):
        print(f"      {rank}. {item.title or item.item_id:<45.45}  {item.score:.3f}  {item.reason}")


async def _replay_and_show(settings: Settings, stack: LocalStack, *, users: int, max_events: int) -> None:
    catalogue = movielens.catalog_events()
    ratings = movielens.ratings()
    chosen = {u for u, _ in Counter(r.user_id for r in ratings).most_common(users)}
    replay = [r for r in ratings if r.user_id in chosen][:max_events]
    # The users shown are those with the most history in what was replayed.
    active = [u for u, _ in Counter(r.user_id for r in replay).most_common()]
    titles = {item.item_id: item.title for item in catalogue}

    async with EventPublisher(settings) as publisher:
        print(f"[2/6] publishing the catalogue: {len(catalogue)} films (title, genres, year) ...", flush=True)
        t0 = time.perf_counter()
        now = time.time()
        for item in catalogue:
            await publisher.publish(item.model_copy(update={"event_time": now}))
        await publisher.flush()
        await _wait_processed(stack, "catalog", len(catalogue))
        print(f"      {len(catalogue)} items embedded and upserted in {time.perf_counter() - t0:.1f}s")

        print(f"[3/6] replaying {len(replay)} ratings of {len(chosen)} users in time order as clicks ...",
              flush=True)
        t0 = time.perf_counter()
        # Event times are re-stamped to now so freshness metrics measure the
        # pipeline, not the age of the 1998 data; the order is kept.
        for index, rating in enumerate(tqdm(replay, unit="ev", mininterval=0.5)):
            event = movielens.click_event(rating, index)
            await publisher.publish(event.model_copy(update={"event_time": time.time()}))
        await publisher.flush()
        await _wait_processed(stack, "clicks", len(replay))
        elapsed = time.perf_counter() - t0
        print(f"      applied {len(replay)} clicks in {elapsed:.1f}s ({len(replay) / elapsed:.0f} events/s)")

    async with ResponseListener(settings) as listener, EventPublisher(settings, linger_ms=0) as publisher:
        print(f"[4/6] recommendations before and after a burst of {BURST_GENRE} clicks:")
        burst_items = [i.item_id for i in catalogue if BURST_GENRE in i.attributes.get("genres", "")]
        for user in active[:SHOW_USERS]:
            print(f"\n  user {user}:")
            before, _ = await _ask(listener, publisher, RecRequest(request_id=uuid.uuid4().hex, user_id=user, k=5))
            _show("before", before)
            seen = {r.item_id for r in replay if r.user_id == user}
            burst = [i for i in burst_items if i not in seen][:5]
            for item_id in burst:
                await publisher.publish(ClickEvent(event_id=uuid.uuid4().hex, event_time=time.time(),
                                                   user_id=user, item_id=item_id, action="purchase"))
            await publisher.flush()
            print(f"    clicked: {', '.join(titles[i] for i in burst)}")
            await _wait_until_stored(settings, user, burst)
            after, _ = await _ask(listener, publisher, RecRequest(request_id=uuid.uuid4().hex, user_id=user, k=5))
            if set(burst) & {i.item_id for i in after.items}:
                raise StreamrecError(f"{user} was recommended a film just bought: {after.model_dump_json()}")
            _show("after", after)

        print(f"\n[5/6] request latency over {LATENCY_REQUESTS} requests per path:")
        kafka_ms, http_ms = [], []
        for n in range(LATENCY_REQUESTS):
            request = RecRequest(request_id=uuid.uuid4().hex, user_id=active[n % len(active)], k=10)
            _, ms = await _ask(listener, publisher, request)
            kafka_ms.append(ms)
            t = time.perf_counter()
            await http_recommend(settings, request.model_copy(update={"request_id": uuid.uuid4().hex}))
            http_ms.append((time.perf_counter() - t) * 1000)
        for path, values in (("kafka (request -> response topic)", kafka_ms), ("http (POST /recommend)", http_ms)):
            print(f"    {path:<36} p50 {_pct(values, 50):6.1f} ms   p99 {_pct(values, 99):6.1f} ms")

    await _show_image_event(settings, stack)
    _print_howto(settings)


async def _wait_until_stored(settings: Settings, user: str, items: list[str], timeout_s: float = 60) -> None:
    """Until the worker's stored sequence of ``user`` holds ``items`` (GET /users/{id})."""
    url = f"http://{settings.http_host}:{settings.http_port}/users/{user}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stored = await asyncio.to_thread(_get_json, url)
        except urllib.error.HTTPError:
            stored = {}
        if set(items) <= set(stored.get("items", [])):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{user}'s clicks not applied after {timeout_s}s")
        await asyncio.sleep(0.02)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


async def _show_image_event(settings: Settings, stack: LocalStack) -> None:
    print("\n[6/6] images: MovieLens films have no photos, so the items above carry none.")
    photo = _demo_photo()
    event = CatalogItem(
        event_id=uuid.uuid4().hex, event_time=time.time(), item_id="demo-poster-1",
        title="Demo poster: a red square on white", category="Poster",
        image=ImageRef(image_b64=base64.b64encode(photo).decode()),
    )
    shown = event.model_dump(exclude_none=True)
    shown["image"] = {"image_b64": shown["image"]["image_b64"][:40] + "...(base64 JPEG)"}
    print(f"    a catalogue event that carries a photo: {shown}")
    print("    (or by path: {\"image\": {\"image_uri\": \"file:///photos/1.jpg\"}} with "
          "STREAMREC_IMAGE_ROOT=/photos)")
    before = stack.worker.metric("streamrec_events_processed_total", {"topic": "catalog"})
    async with EventPublisher(settings, linger_ms=0) as publisher:
        await publisher.publish(event)
        await publisher.flush()
    await _wait_processed(stack, "catalog", before + 1, timeout_s=60)
    response = await http_recommend(settings, RecRequest(
        request_id=uuid.uuid4().hex, user_id="visual-searcher", k=3,
        image=ImageRef(image_b64=base64.b64encode(_demo_photo(shade=200)).decode()),
    ))
    _show("visual search with a similar photo (POST /recommend with an image)", response, n=3)


def _demo_photo(shade: int = 220) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(image).rectangle((64, 64, 192, 192), fill=(shade, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def _print_howto(settings: Settings) -> None:
    b = settings.bootstrap_servers
    print(f"""
How to use it yourself (start `streamrec broker` and `streamrec worker` first):
  publish a click  : key u1, value {{"event_id":"e-1","event_time":{time.time():.0f},"user_id":"u1","item_id":"m50","action":"click"}}
                     to {settings.topic('clicks')} on {b}, with any Kafka client built on librdkafka >= 2.2
                     (README, "Publishing events"; Debian's kcat 1.7 cannot talk to the embedded broker)
  ask over Kafka   : streamrec recommend u1 -k 10
  ask over HTTP    : curl -s -X POST http://{settings.http_host}:{settings.http_port}/recommend \\
                       -d '{{"request_id":"r1","user_id":"u1","k":10}}'
  read responses   : consume topic {settings.topic('responses')} (JSON, keyed by user id)
  metrics          : curl -s http://{settings.http_host}:{settings.http_port}/metrics""")
