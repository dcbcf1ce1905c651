"""``streamrec demo``: the learning loop on MovieLens-100k, through the embedded stack.

One embedded broker and two workers, each with its own topics and store:
``rule`` serves the content rule model from start to end; ``loop`` starts on
the same rule model, and its registry is where the fine-tuner promotes.

1. the catalogue and the first part of the ratings (in time order, as clicks)
   go to both workers;
2. one fine-tuning cycle drains the ``loop`` stack's topics, trains a first
   model from them (no weights exist anywhere), evaluates it against the rule
   model on each user's newest interaction and promotes it if it is better;
   the ``loop`` worker hot-swaps to it;
3. the next ratings are replayed prequentially: before each one both workers
   are asked for the user's top 10 (HTTP), then the click goes to both; the
   hit rates at 10 are printed side by side, with a PNG of the cumulative
   hit rate of both;
4. the ``loop`` worker's drift gauges and ``streamrec status``; then, on it,
   recommendations before and after a burst of clicks, request latencies over
   Kafka and HTTP, a catalogue event with a photo and a visual search.

With ``--posters DIR`` (``bench.posters``) the films replayed carry their real
plots and posters: the workers embed the posters as the items' photos, the
fine-tuning cycle trains on their vectors, and the
visual search is made with one of them; without it, MovieLens films have no
photos and a synthetic photo shows the path.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from bench import movielens
from bench.common import stack_settings, start_broker
from bench.posters import PostersFolder, load_posters, show_visual_search
from bench.prequential import plot_side_by_side, served_version, side_by_side
from bench.prequential_eval import Interaction
from bench.stack import WorkerProcess
from core.errors import StreamrecError
from core.events import CatalogItem, ClickEvent, ImageRef, RecRequest, RecResponse
from core.settings import Settings
from stream.broker import ensure_topics
from stream.client import EventPublisher, ResponseListener, http_recommend

BURST_GENRE = "Sci-Fi"
SHOW_USERS = 3
LATENCY_REQUESTS = 50
NEXT_SCORED = 600  # ratings replayed prequentially after the swap
TRAIN_MINUTES = 1.2  # the fine-tuning cycle's training budget
EVENT_SPACING_S = 0.01  # replayed events keep their order, re-stamped close to now
DRIFT_GAUGES = ("streamrec_drift_score_psi", "streamrec_drift_embedding_shift", "streamrec_drift_ctr_ratio",
                "streamrec_drift_popularity_gini")


def demo_models(base: Settings, folder: Path) -> Path:
    """A model folder with the exported towers and rule scorer and an empty registry."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("towers", "rule"):
        source = (base.models_path / name).resolve()
        if not source.is_dir():
            raise StreamrecError(f"{source} is missing: run `streamrec setup` first")
        (folder / name).symlink_to(source, target_is_directory=True)
    return folder


def run_demo(settings: Settings, *, users: int, events: int, posters: Path | None = None) -> int:
    """``users``: the most active users replayed; ``events``: ratings in the first part;
    ``posters``: a MovieLens posters folder (``bench.posters``), checked before anything starts."""
    from model.export.prepare import prepare_models

    demo_dir = settings.data_dir / "demo"
    started = time.perf_counter()
    catalogue = movielens.catalog_events()
    folder = load_posters(posters, {item.item_id for item in catalogue}) if posters is not None else None
    if folder is not None:
        print(f"--posters {folder.root}: {len(folder.films)} films, {len(folder.with_poster)} with a poster, "
              f"{sum(1 for f in folder.films.values() if f.description)} with a plot")
    # Posters are catalogue photos given by path: workers read them under the folder.
    photos = {"image_root": folder.root.resolve()} if folder is not None else {}
    prepare_models(settings)
    for name in ("rule", "loop", "logs"):
        shutil.rmtree(demo_dir / name, ignore_errors=True)
    print(f"[1/7] starting the embedded broker and two workers (logs in {demo_dir / 'logs'}) ...", flush=True)
    broker = start_broker(demo_dir / "logs")
    workers: dict[str, WorkerProcess] = {}
    try:
        stacks = {
            "rule": stack_settings(settings, broker, demo_dir / "rule", "demo-rule",
                                   model_dir=demo_models(settings, demo_dir / "rule" / "models"), **photos),
            "loop": stack_settings(settings, broker, demo_dir / "loop", "demo-loop",
                                   model_dir=demo_models(settings, demo_dir / "loop" / "models"),
                                   finetune_minutes=TRAIN_MINUTES, **photos),
        }
        for name, stack in stacks.items():
            asyncio.run(ensure_topics(stack))
            workers[name] = WorkerProcess(stack, log_path=demo_dir / "logs" / f"{name}-worker.log").start()
        for worker in workers.values():
            worker.wait_ready(300.0)
        print(f"      ready in {time.perf_counter() - started:.1f}s (broker {broker.bootstrap}; "
              + ", ".join(f"{name} worker http://{s.http_host}:{s.http_port}" for name, s in stacks.items()) + ")")
        asyncio.run(_loop(stacks, workers, demo_dir, catalogue, folder, users=users, first_events=events))
    finally:
        for worker in workers.values():
            worker.stop()
        broker.stop()
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s")
    return 0


async def _wait_processed(worker: WorkerProcess, topic: str, target: float, timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    done = 0.0
    while time.monotonic() < deadline:
        done = worker.metric("streamrec_events_processed_total", {"topic": topic}) + \
            worker.metric("streamrec_deadletter_total")
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


async def _publish_all(stacks: dict[str, Settings], events: list) -> None:  # type: ignore[type-arg]
    for stack in stacks.values():
        async with EventPublisher(stack) as publisher:
            for event in events:
                await publisher.publish(event)
            await publisher.flush()


async def _loop(stacks: dict[str, Settings], workers: dict[str, WorkerProcess], demo_dir: Path,
                catalogue: list[CatalogItem], posters: PostersFolder | None, *, users: int, first_events: int) -> None:
    ratings = movielens.ratings()
    chosen = {u for u, _ in Counter(r.user_id for r in ratings).most_common(users)}
    replay = [r for r in ratings if r.user_id in chosen]
    first, following = replay[:first_events], replay[first_events : first_events + NEXT_SCORED]
    if not following:
        raise StreamrecError(f"--events {first_events} leaves no rating of these {users} users to replay after it")
    if posters is not None:
        # Only the films the demo replays get their plot and poster: the others are never
        # clicked, and every poster costs each worker (and the fine-tuner) an image-tower pass.
        catalogue = posters.catalogue(catalogue, only={r.item_id for r in first + following})
    clock = time.time() - (len(first) + len(following)) * EVENT_SPACING_S
    loop_stack, loop_worker = stacks["loop"], workers["loop"]

    photos = sum(1 for item in catalogue if item.image is not None)
    plots = sum(1 for item in catalogue if item.description)
    content = (f"title, genres, year; the {photos} posters and {plots} plots of the films replayed"
               if posters is not None else "title, genres, year")
    print(f"[2/7] publishing the catalogue to both workers: {len(catalogue)} films ({content}) ...", flush=True)
    t0 = time.perf_counter()
    now = time.time()
    await _publish_all(stacks, [item.model_copy(update={"event_time": now}) for item in catalogue])
    for worker in workers.values():
        await _wait_processed(worker, "catalog", len(catalogue))
    print(f"      {len(catalogue)} items embedded and upserted by both in {time.perf_counter() - t0:.1f}s"
          + (f" ({photos} posters through the image tower in each)" if posters is not None else ""))

    print(f"[3/7] the first part: {len(first)} ratings of {len(chosen)} users, in time order, as clicks, "
          "under the rule model ...", flush=True)
    t0 = time.perf_counter()
    clicks = [movielens.click_event(r, n).model_copy(update={"event_time": clock + n * EVENT_SPACING_S})
              for n, r in enumerate(first)]
    await _publish_all(stacks, clicks)
    for worker in workers.values():
        await _wait_processed(worker, "clicks", len(clicks))
    print(f"      applied by both in {time.perf_counter() - t0:.1f}s; serving: "
          + ", ".join(f"{name} {served_version(w)}" for name, w in workers.items()))

    print("[4/7] one fine-tuning cycle from the loop stack's topics (no trained weights exist yet) ...", flush=True)
    decision = await asyncio.to_thread(_finetune, loop_stack)
    if decision.decision == "promoted":
        t0 = time.perf_counter()
        while served_version(loop_worker) != decision.candidate_version:
            if time.perf_counter() - t0 > 120:
                raise StreamrecError(f"the loop worker did not swap to {decision.candidate_version} in 120 s")
            await asyncio.sleep(0.2)
        print(f"      hot swap: the loop worker serves {decision.candidate_version} "
              f"{time.perf_counter() - t0:.1f}s after the promotion")
    else:
        print("      not promoted: the loop worker keeps serving the rule model (the next cycle, with more "
              "clicks, tries again)")

    print(f"[5/7] the next {len(following)} ratings, prequentially: both workers asked for the user's top 10 "
          "(seen films excluded), then the click applied to both ...", flush=True)
    seen: dict[str, set[str]] = {}
    for rating in first:
        seen.setdefault(rating.user_id, set()).add(rating.item_id)
    offset = len(first)
    events = {}
    interactions = []
    for n, rating in enumerate(following):
        interaction = Interaction(rating.user_id, rating.item_id, clock + (offset + n) * EVENT_SPACING_S,
                                  offset + n, scored=True)
        events[interaction.position] = movielens.click_event(rating, offset + n).model_copy(
            update={"event_time": interaction.time})
        interactions.append(interaction)
    result = await side_by_side(interactions, stacks, workers, seen, click=lambda i: events[i.position])
    versions = {name: served_version(worker) for name, worker in workers.items()}
    print(f"\n      {'':<34} {'rule worker':>14} {'loop worker':>14}")
    print(f"      {'model':<34} {versions['rule']:>14.14} {versions['loop']:>14.14}  ({versions['loop']})")
    print(f"      {'HR@10 on the same ' + str(result.scores['rule'].count) + ' requests':<34} "
          f"{result.scores['rule'].hit_rate:>14.4f} {result.scores['loop'].hit_rate:>14.4f}")
    print(f"      {'NDCG@10':<34} {result.scores['rule'].ndcg:>14.4f} {result.scores['loop'].ndcg:>14.4f}")
    print(f"      {'failed requests':<34} {result.failed_requests:>29d}")
    plot = demo_dir / "loop-hit-rate.png"
    plot_side_by_side(result, {"rule": f"rule worker ({versions['rule']})", "loop": f"loop worker ({versions['loop']})"},
                      plot, f"MovieLens-100k, next {len(following)} ratings of {len(chosen)} users, asked then applied")
    print(f"      cumulative HR@10 of both: {plot}  ({result.seconds:.0f}s)")

    print("\n[6/7] the loop worker's drift gauges (reference: the first scores after the swap) and `streamrec status`:")
    for gauge in DRIFT_GAUGES:
        print(f"      {gauge:<36} {loop_worker.metric(gauge):.4f}")
    from exporter.status import main as status_main

    status_main(["--url", f"http://{loop_stack.http_host}:{loop_stack.http_port}/metrics", "--interval", "1"])
    print("  (freshness is an event's own time to its effect: the replayed ratings keep their 1997 times,\n"
          "   so it sits in the top bucket here; `streamrec bench freshness` measures it on live clicks)")

    print(f"\n[7/7] on the loop worker: recommendations before and after a burst of {BURST_GENRE} clicks:")
    titles = {item.item_id: item.title for item in catalogue}
    active = [u for u, _ in Counter(r.user_id for r in first).most_common()]
    async with ResponseListener(loop_stack) as listener, EventPublisher(loop_stack, linger_ms=0) as publisher:
        burst_items = [i.item_id for i in catalogue if BURST_GENRE in i.attributes.get("genres", "")]
        for user in active[:SHOW_USERS]:
            print(f"\n  user {user}:")
            before, _ = await _ask(listener, publisher, RecRequest(request_id=uuid.uuid4().hex, user_id=user, k=5))
            _show("before", before)
            burst = [i for i in burst_items if i not in seen.get(user, set())][:5]
            for item_id in burst:
                await publisher.publish(ClickEvent(event_id=uuid.uuid4().hex, event_time=time.time(),
                                                   user_id=user, item_id=item_id, action="purchase"))
            await publisher.flush()
            print(f"    clicked: {', '.join(titles[i] for i in burst)}")
            await _wait_until_stored(loop_stack, user, burst)
            after, _ = await _ask(listener, publisher, RecRequest(request_id=uuid.uuid4().hex, user_id=user, k=5))
            if set(burst) & {i.item_id for i in after.items}:
                raise StreamrecError(f"{user} was recommended a film just bought: {after.model_dump_json()}")
            _show("after", after)

        print(f"\n  request latency over {LATENCY_REQUESTS} requests per path:")
        kafka_ms, http_ms = [], []
        for n in range(LATENCY_REQUESTS):
            request = RecRequest(request_id=uuid.uuid4().hex, user_id=active[n % len(active)], k=10)
            _, ms = await _ask(listener, publisher, request)
            kafka_ms.append(ms)
            t = time.perf_counter()
            await http_recommend(loop_stack, request.model_copy(update={"request_id": uuid.uuid4().hex}))
            http_ms.append((time.perf_counter() - t) * 1000)
        for path, values in (("kafka (request -> response topic)", kafka_ms), ("http (POST /recommend)", http_ms)):
            print(f"    {path:<36} p50 {_pct(values, 50):6.1f} ms   p99 {_pct(values, 99):6.1f} ms")

    if posters is None:
        await _show_image_event(loop_stack, loop_worker)
    else:
        await _show_posters(loop_stack, catalogue, posters, first)
    _print_howto(loop_stack)


def _finetune(settings: Settings):  # type: ignore[no-untyped-def]
    """One cycle in this process (torch on both cores while the workers idle); prints what it decided."""
    import torch

    from finetune.job import run_cycle

    torch.set_num_threads(2)
    logging.getLogger("finetune").setLevel(logging.ERROR)  # the decision is printed below, in short
    # Its encoders (plots, posters) and evaluation on both cores too.
    decision = run_cycle(settings.model_copy(update={"onnx_threads": 2}))
    timings = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in decision.timings.items())
    photos = decision.vocabulary.get("items_with_photo", 0)
    print(f"      drained {decision.interactions} interactions of {decision.users} users; trained from "
          f"{decision.start} ({decision.vocabulary.get('items')} items"
          + (f", {photos} with a poster" if photos else "") + f"); {timings}")
    candidate, serving = decision.candidate_metrics, decision.serving_metrics
    print(f"      held out (each user's newest interaction): candidate HR@10 {candidate.get('hr@10', 0):.4f} "
          f"NDCG@10 {candidate.get('ndcg@10', 0):.4f} vs serving {decision.serving_version} HR@10 "
          f"{serving.get('hr@10', 0):.4f} NDCG@10 {serving.get('ndcg@10', 0):.4f}")
    ranker = decision.ranker
    if ranker:
        print(f"      ranker {ranker['decision']} (held-out NDCG@10 {ranker['heldout_ndcg@10_ranked']:.4f} ranked, "
              f"{ranker['heldout_ndcg@10_retrieval_alone']:.4f} retrieval alone)")
    print(f"      decision: {decision.decision} {decision.candidate_version} ({decision.reason})", flush=True)
    return decision


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


async def _show_image_event(settings: Settings, worker: WorkerProcess) -> None:
    print("\n  images: MovieLens-100k has no photos, so the films above carry none "
          "(`streamrec demo --posters DIR` gives them their real posters).")
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
    before = worker.metric("streamrec_events_processed_total", {"topic": "catalog"})
    async with EventPublisher(settings, linger_ms=0) as publisher:
        await publisher.publish(event)
        await publisher.flush()
    await _wait_processed(worker, "catalog", before + 1, timeout_s=60)
    response = await http_recommend(settings, RecRequest(
        request_id=uuid.uuid4().hex, user_id="visual-searcher", k=3,
        image=ImageRef(image_b64=base64.b64encode(_demo_photo(shade=200)).decode()),
    ))
    _show("visual search with a similar photo (POST /recommend with an image)", response, n=3)


async def _show_posters(settings: Settings, catalogue: list[CatalogItem], posters: PostersFolder,
                        first: list[movielens.Rating]) -> None:
    """The real posters: one catalogue event as published, and a visual search with the poster
    of the most rated film (in the first part) that has one."""
    with_poster = {item.item_id: item for item in catalogue if item.image is not None}
    counts = Counter(r.item_id for r in first if r.item_id in with_poster)
    chosen = counts.most_common(1)[0][0] if counts else next(iter(with_poster))
    shown = with_poster[chosen].model_dump(exclude_none=True)
    shown["description"] = shown.get("description", "")[:60] + "..."
    print(f"\n  images: the films carry their real posters (STREAMREC_IMAGE_ROOT={posters.root}); "
          f"a catalogue event as published: {shown}")
    await show_visual_search(settings, posters, chosen)


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
