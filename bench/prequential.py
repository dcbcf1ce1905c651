"""``streamrec bench prequential``: test-then-learn evaluation through the running pipeline.

Interactions are replayed in time order (S3-Rec files: each user's order, users
taking turns) through a real broker and two real workers on it:

* online: receives every interaction;
* frozen: receives only the warm-up interactions (same model, no online updates).

For each interaction after a user's warm-up, both workers are asked for the
user's top 10 over HTTP (POST /recommend, the production request path) before
the interaction is published, and the interaction is applied before that
user's next request (the worker's processed-events metric is polled).
Alongside, in this process: global popularity and river's online matrix
factorisation learn the same events one at a time. Every method is asked to
leave out the items the user has already interacted with (the requests carry
them as ``exclude_ids``), so the comparison is about the ranking only.
"""
from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from bench import movielens
from bench.common import (
    RecordingPublisher,
    bench_parser,
    report,
    stack_settings,
    start_broker,
    wait_for,
    work_dir,
)
from bench.prequential_eval import (
    Catalogue,
    Interaction,
    PopularityBaseline,
    RankingScore,
    RiverMF,
    replay_order,
    select_users,
    warmup_length,
    waves,
)
from bench.stack import WorkerProcess
from core.errors import ConfigError, StreamrecError
from core.events import CatalogItem, ClickEvent, RecRequest, RequestFilters
from core.settings import Settings, load_settings
from model.serving.contract import CATEGORY_SEPARATOR
from model.training.data import InteractionData, load_ml100k, load_s3rec
from stream.broker import ensure_topics
from stream.client import http_recommend
from stream.covisit import StreamTransitions, fusion_weight

K = 10
METHODS = ("online", "frozen", "pop", "river")
CATALOGUE_TIME = 1.0e9  # S3-Rec has no times: catalogue and events get synthetic ones
APPLY_TIMEOUT_S = 120.0


@dataclass
class Replay:
    """What one run replays: the catalogue, the users' sequences and their times."""

    catalogue: list[CatalogItem]
    sequences: dict[str, list[str]]
    timestamps: dict[str, list[float]] | None


@dataclass
class Counters:
    """Click events published to each worker, and how many it had processed before them."""

    published: dict[str, int] = field(default_factory=lambda: {"online": 0, "frozen": 0})
    baseline: dict[str, float] = field(default_factory=lambda: {"online": 0.0, "frozen": 0.0})


# -- the data -------------------------------------------------------------------------


def _catalogue_from(data: InteractionData) -> list[CatalogItem]:
    """S3-Rec items: no title, their attribute ids as category and attributes."""
    items = []
    for index, item_id in enumerate(data.item_ids, start=1):
        names = [data.attribute_names[a - 1] for a in data.attributes[index].tolist() if a > 0]
        items.append(CatalogItem(
            event_id=f"preq-item-{item_id}", event_time=CATALOGUE_TIME, item_id=item_id, title="",
            category=CATEGORY_SEPARATOR.join(names)[:200],
            attributes={"attribute_ids": " ".join(names)[:500]} if names else {},
        ))
    return items


def _ml100k_catalogue(data: InteractionData) -> list[CatalogItem]:
    """MovieLens films via ``bench.movielens``, under the training data's ids and genre names.

    ``bench.movielens`` prefixes ids with ``m`` and keeps one genre as the
    category; a model trained with ``streamrec train --format ml100k`` knows
    the plain ids and every genre, so the catalogue speaks its language.
    """
    known = set(data.item_ids)
    items = []
    for item in movielens.catalog_events():
        item_id = item.item_id.removeprefix("m")
        if item_id in known:
            genres = item.attributes.get("genres", "").split()
            items.append(item.model_copy(update={"item_id": item_id,
                                                 "category": CATEGORY_SEPARATOR.join(genres)[:200]}))
    return items


def load_replay(data_format: str, path: Path | None, users: int | None, seed: int,
                max_per_user: int | None) -> Replay:
    if data_format == "ml100k":
        data = load_ml100k(path)
        catalogue = _ml100k_catalogue(data)
        user_prefix = "u"
    elif data_format == "s3rec":
        if path is None:
            raise ConfigError("--data is required for the s3rec format")
        data = load_s3rec(path)
        catalogue = _catalogue_from(data)
        user_prefix = "s"
    else:
        raise ConfigError(f"unknown format {data_format!r}; expected s3rec or ml100k")
    chosen = set(select_users(data.user_ids, users, seed))
    sequences: dict[str, list[str]] = {}
    timestamps: dict[str, list[float]] | None = {} if data.timestamps is not None else None
    for n, user_id in enumerate(data.user_ids):
        if user_id not in chosen:
            continue
        items = [data.item_ids[i - 1] for i in data.sequences[n].tolist()][:max_per_user]
        sequences[f"{user_prefix}{user_id}"] = items
        if timestamps is not None and data.timestamps is not None:
            timestamps[f"{user_prefix}{user_id}"] = data.timestamps[n].tolist()[:len(items)]
    return Replay(catalogue, sequences, timestamps)


def click_of(interaction: Interaction) -> ClickEvent:
    return ClickEvent(
        event_id=f"preq-{interaction.user_id}-{interaction.position}",
        # S3-Rec positions are not times; offset them past the catalogue's time.
        event_time=interaction.time if interaction.time > 1e6 else CATALOGUE_TIME + interaction.time,
        user_id=interaction.user_id,
        item_id=interaction.item_id,
    )


# -- the stacks -----------------------------------------------------------------------


def train_on_warmup(data_format: str, path: Path | None, fraction: float, max_per_user: int | None,
                    minutes: float, out: Path) -> Path:
    """Train an artefact on every user's warm-up prefix only, so no scored interaction is seen.

    All users of the file contribute their prefix (the replay may sample fewer);
    the prefix is what ``replay_order`` publishes before it scores anything.
    """
    from dataclasses import replace

    from model.training.train import FORMAT_RETRIEVAL, train_artefact

    data = load_ml100k(path) if data_format == "ml100k" else load_s3rec(path)  # type: ignore[arg-type]
    prefixes: list = []
    times: list | None = [] if data.timestamps is not None else None
    for n, sequence in enumerate(data.sequences):
        sequence = sequence[:max_per_user]
        warm = warmup_length(len(sequence), fraction)
        prefixes.append(sequence[:warm])
        if times is not None and data.timestamps is not None:
            times.append(data.timestamps[n][:warm])
    warm_data = replace(data, name=data.name, sequences=prefixes, timestamps=times)
    retrieval = replace(FORMAT_RETRIEVAL[data_format], minutes=minutes)
    print(f"training on the warm-up prefixes of {len(prefixes)} users "
          f"({sum(len(p) for p in prefixes)} interactions), at most {minutes:g} min ...", flush=True)
    manifest = train_artefact(warm_data, data_format, path, out, retrieval=retrieval, progress=False)
    print(f"  trained {manifest['version']} in {manifest['train_seconds']} s", flush=True)
    return out


def private_model_dir(base: Settings, artefact: Path, folder: Path) -> Path:
    """A model folder whose ``current`` is ``artefact`` and whose towers are the configured ones."""
    if not artefact.is_dir():
        raise ConfigError(f"--artefact {artefact} is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    towers = (base.models_path / "towers").resolve()
    if not towers.is_dir():
        raise ConfigError(f"no exported towers under {towers}; run `streamrec setup` first")
    for name, target in (("towers", towers), ("current", artefact.resolve())):
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return folder


CLICK_SAMPLES = (("streamrec_events_processed_total", 'topic="clicks"'),
                 ("streamrec_events_duplicate_total", 'topic="clicks"'),
                 ("streamrec_deadletter_total", ""))


def processed_clicks(worker: WorkerProcess) -> float:
    """Clicks this worker has finished with (applied, skipped as duplicate or dead-lettered), one scrape."""
    total = 0.0
    for line in worker.metrics_text().splitlines():
        head, _, value = line.rpartition(" ")
        name = head.split("{")[0]
        if any(name == wanted and label in head for wanted, label in CLICK_SAMPLES):
            total += float(value)
    return total


def wait_applied(workers: dict[str, WorkerProcess], counters: Counters) -> None:
    """Until each worker has processed every click published to it (polled every few ms)."""
    for name, worker in workers.items():
        target = counters.baseline[name] + counters.published[name]
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while True:
            try:
                if processed_clicks(worker) >= target:
                    break
            except OSError:  # a slow scrape on a busy machine; the next poll decides
                if worker.process is None or worker.process.poll() is not None:
                    raise StreamrecError(f"the {name} worker has exited; see its log") from None
            if time.monotonic() > deadline:
                raise StreamrecError(f"{name} worker did not apply {target:.0f} clicks within {APPLY_TIMEOUT_S}s")
            time.sleep(0.002)


# -- the replay -----------------------------------------------------------------------


@dataclass
class Evaluation:
    scores: dict[str, RankingScore] = field(default_factory=lambda: {m: RankingScore(K) for m in METHODS})
    events: int = 0
    failed_requests: int = 0
    # Where the replay's wall time went (seconds).
    waiting_s: float = 0.0
    asking_s: float = 0.0
    publishing_s: float = 0.0


async def _ask(session: aiohttp.ClientSession, settings: Settings, user_id: str, seen: set[str]) -> list[str]:
    request = RecRequest(request_id=f"preq-{time.monotonic_ns()}-{user_id}", user_id=user_id, k=K,
                         filters=RequestFilters(exclude_ids=sorted(seen)[:10_000]))
    response = await http_recommend(settings, request, timeout_s=30.0, session=session)
    return [item.item_id for item in response.items]


async def replay(interactions: Sequence[Interaction], stacks: dict[str, Settings],
                 workers: dict[str, WorkerProcess], catalogue: Catalogue, seed: int,
                 progress_every: int = 500) -> Evaluation:
    evaluation = Evaluation()
    popularity = PopularityBaseline(catalogue)
    river = RiverMF(catalogue, seed=seed)
    counters = Counters()
    for name, worker in workers.items():
        counters.baseline[name] = await asyncio.to_thread(processed_clicks, worker)
    seen: dict[str, set[str]] = {}
    started, next_report = time.monotonic(), progress_every
    async with RecordingPublisher(stacks["online"], linger_ms=0) as online, \
            RecordingPublisher(stacks["frozen"], linger_ms=0) as frozen, aiohttp.ClientSession() as session:
        for wave in waves(interactions):
            scored = [i for i in wave if i.scored]
            if scored:
                t0 = time.perf_counter()
                await online.settle()
                await frozen.settle()
                await asyncio.to_thread(wait_applied, workers, counters)
                t1 = time.perf_counter()
                answers = await asyncio.gather(
                    *(_ask(session, stacks[name], i.user_id, seen.get(i.user_id, set()))
                      for i in scored for name in ("online", "frozen")),
                    return_exceptions=True,
                )
                evaluation.waiting_s += t1 - t0
                evaluation.asking_s += time.perf_counter() - t1
                for n, interaction in enumerate(scored):
                    exclude = seen.get(interaction.user_id, set())
                    for m, name in enumerate(("online", "frozen")):
                        answer = answers[2 * n + m]
                        if isinstance(answer, BaseException):
                            evaluation.failed_requests += 1
                            answer = []
                        evaluation.scores[name].update(answer, interaction.item_id)
                    evaluation.scores["pop"].update(popularity.rank(interaction.user_id, exclude, K),
                                                    interaction.item_id)
                    evaluation.scores["river"].update(river.rank(interaction.user_id, exclude, K),
                                                      interaction.item_id)
            t2 = time.perf_counter()
            for interaction in wave:
                click = click_of(interaction)
                await online.publish(click)
                counters.published["online"] += 1
                if not interaction.scored:
                    await frozen.publish(click)
                    counters.published["frozen"] += 1
                popularity.learn_one(interaction.user_id, interaction.item_id)
                river.learn_one(interaction.user_id, interaction.item_id)
                seen.setdefault(interaction.user_id, set()).add(interaction.item_id)
                evaluation.events += 1
            evaluation.publishing_s += time.perf_counter() - t2
            if evaluation.scores["online"].count >= next_report:
                next_report += progress_every
                hr = "  ".join(f"{m} {evaluation.scores[m].hit_rate:.4f}" for m in METHODS)
                print(f"  {evaluation.events}/{len(interactions)} events, "
                      f"{evaluation.scores['online'].count} scored, {time.monotonic() - started:.0f}s: HR@10 {hr}",
                      flush=True)
        await online.settle()
        await frozen.settle()
    return evaluation


@dataclass
class SideBySide:
    """Several workers asked the same requests; every one receives every interaction."""

    scores: dict[str, RankingScore]
    failed_requests: int = 0
    events: int = 0
    seconds: float = 0.0


async def side_by_side(interactions: Sequence[Interaction], stacks: dict[str, Settings],
                       workers: dict[str, WorkerProcess], seen: dict[str, set[str]],
                       click: Callable[[Interaction], ClickEvent] = click_of,
                       progress_every: int = 500) -> SideBySide:
    """Test, then learn, on each worker: before a scored interaction is published, every
    worker is asked for the user's top ``K`` (what the user did so far excluded: ``seen``,
    updated here); the interaction is then published to every worker, and applied by all of
    them before that user is asked again (``waves``)."""
    result = SideBySide({name: RankingScore(K) for name in stacks})
    counters = Counters(published={name: 0 for name in stacks}, baseline={name: 0.0 for name in stacks})
    for name, worker in workers.items():
        counters.baseline[name] = await asyncio.to_thread(processed_clicks, worker)
    started, next_report = time.monotonic(), progress_every
    publishers = {name: RecordingPublisher(settings, linger_ms=0) for name, settings in stacks.items()}
    for publisher in publishers.values():
        await publisher.__aenter__()
    try:
        async with aiohttp.ClientSession() as session:
            for wave in waves(interactions):
                scored = [i for i in wave if i.scored]
                if scored:
                    for publisher in publishers.values():
                        await publisher.settle()
                    await asyncio.to_thread(wait_applied, workers, counters)
                    answers = await asyncio.gather(
                        *(_ask(session, stacks[name], i.user_id, seen.get(i.user_id, set()))
                          for i in scored for name in stacks),
                        return_exceptions=True,
                    )
                    for n, interaction in enumerate(scored):
                        for m, name in enumerate(stacks):
                            answer = answers[n * len(stacks) + m]
                            if isinstance(answer, BaseException):
                                result.failed_requests += 1
                                answer = []
                            result.scores[name].update(answer, interaction.item_id)
                for interaction in wave:
                    event = click(interaction)
                    for name, publisher in publishers.items():
                        await publisher.publish(event)
                        counters.published[name] += 1
                    seen.setdefault(interaction.user_id, set()).add(interaction.item_id)
                    result.events += 1
                first = next(iter(result.scores.values()))
                if first.count >= next_report:
                    next_report += progress_every
                    rates = "  ".join(f"{name} {score.hit_rate:.4f}" for name, score in result.scores.items())
                    print(f"      {first.count} scored, {time.monotonic() - started:.0f}s: HR@10 {rates}", flush=True)
        for publisher in publishers.values():
            await publisher.settle()
    finally:
        for publisher in publishers.values():
            await publisher.__aexit__(None, None, None)
    result.seconds = time.monotonic() - started
    return result


def plot_side_by_side(result: SideBySide, labels: dict[str, str], path: Path, title: str) -> None:
    """PNG of each worker's cumulative HR@10 over the scored interactions."""
    plot_cumulative({f"{labels.get(name, name)} (HR@10 {score.hit_rate:.4f})": score.cumulative_hr
                     for name, score in result.scores.items()},
                    path, title, xlabel="scored interactions (asked, then applied)")


def plot_cumulative(curves: dict[str, Sequence[float]], path: Path, title: str, *, xlabel: str) -> None:
    """One PNG of cumulative HR@10 curves, keyed by their legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for label, curve in curves.items():
        axes.plot(range(1, len(curve) + 1), curve, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("cumulative HR@10")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


# -- the same requests, offline -------------------------------------------------------


@dataclass
class OfflineRequest:
    worker: str  # "online" or "frozen": whose state the request is asked against
    history: list[int]  # the model's item indices the worker's user state holds, oldest first
    seen: list[int]  # what the request excludes (everything the user did so far)
    time: float  # the user's latest event time in that state
    target: str
    covisit: list[str] = field(default_factory=list)  # the worker's co-visit candidates, best first


CoVisitRanking = Callable[[StreamTransitions, list[str], set[str]], list[str]]


def offline_requests(interactions: Sequence[Interaction], item_index: dict[str, int],
                     covisit: CoVisitRanking | None = None) -> list[OfflineRequest]:
    """Every scored interaction asked of both workers, as each worker's state stood at that point.

    ``covisit(transitions, recent item ids, excluded ids)`` ranks co-visit
    candidates given what that worker's stream taught it so far: the online
    worker learns from every interaction, the frozen one from the warm-up ones.
    """
    history: dict[str, list[int]] = {}
    history_ids: dict[str, list[str]] = {}
    warm: dict[str, tuple[list[int], list[str], float]] = {}
    latest: dict[str, float] = {}
    learnt = {name: StreamTransitions(max_items=1 << 30) for name in ("online", "frozen")}
    requests = []
    # As the replay asks: a wave's requests all see the state before the wave
    # (co-visits are learnt across users, so this matters for them).
    for wave in waves(interactions):
        for interaction in wave:
            if not interaction.scored:
                continue
            user = interaction.user_id
            done, done_ids = history.setdefault(user, []), history_ids.setdefault(user, [])
            frozen_history, frozen_ids, frozen_time = warm[user]
            seen = set(done_ids)
            for name, ids, indices, at in (("online", done_ids, done, latest[user]),
                                           ("frozen", frozen_ids, frozen_history, frozen_time)):
                suggested = covisit(learnt[name], ids[-learnt[name].window:], seen) if covisit else []
                requests.append(OfflineRequest(name, list(indices), list(done), at, interaction.item_id, suggested))
        for interaction in wave:
            user = interaction.user_id
            done, done_ids = history.setdefault(user, []), history_ids.setdefault(user, [])
            learnt["online"].learn(done_ids, interaction.item_id)
            if not interaction.scored:
                learnt["frozen"].learn(done_ids, interaction.item_id)
            done.append(item_index.get(interaction.item_id, 0))
            done_ids.append(interaction.item_id)
            latest[user] = click_of(interaction).event_time
            if not interaction.scored:
                warm[user] = (list(done), list(done_ids), latest[user])
    return requests


def offline_replay(artefact: Path, interactions: Sequence[Interaction], settings: Settings,
                   batch: int = 256) -> dict[str, RankingScore]:
    """HR@10 of the served artefact's own networks on the replay's requests, without the pipeline.

    Retrieval is exact (dot product over the artefact's catalogue, seen items
    left out), then the ranker with the model's context features at the
    user's latest event over its pool (the retrieval top ``rank_pool``), fused
    with the co-visit candidates each worker's transitions give (the model's
    table plus what that worker's clicks taught it), then the diversity
    re-rank the workers run. What the workers add that this does not: trending
    candidates, and content-only vectors for items the model has no id for
    (here never retrieved). The replay's online and frozen figures should
    match these; a gap means the pipeline serves something other than what
    the model predicts.
    """
    from model.serving.contract import ACTION_CODE
    from model.serving.covisit import ranked
    from model.serving.trained import TrainedModel
    from model.training.data import left_pad
    from stream.recommend import COVISIT_CANDIDATES, rerank

    model = TrainedModel(artefact, threads=2)
    vectors = model.catalogue_vectors()  # (N+1, d), row 0 unknown
    text = model.catalogue_content(np.arange(model.n_items + 1)).text
    item_ids = np.asarray(model.item_ids, dtype=object)
    scores = {name: RankingScore(K) for name in ("online", "frozen")}

    weight = fusion_weight(settings.covisit_weight, model)

    def covisit(learnt: StreamTransitions, recent: list[str], seen: set[str]) -> list[str]:
        if weight <= 0.0 or not recent:
            return []
        found = learnt.scores(recent, model.transitions, model.item_index, model.item_ids)
        return ranked(found, seen | set(recent), COVISIT_CANDIDATES)

    requests = offline_requests(interactions, model.item_index, covisit)
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        padded = left_pad([np.asarray(r.history, dtype=np.int64) for r in chunk], model.max_sequence)
        users = model.user_vectors(vectors[padded], np.where(padded > 0, ACTION_CODE["click"], 0))
        retrieval = users @ vectors.T  # (b, N+1)
        retrieval[:, 0] = -np.inf
        for row, request in enumerate(chunk):
            retrieval[row, request.seen] = -np.inf
            count = min(settings.candidates, int(np.isfinite(retrieval[row]).sum()))
            pool = np.argpartition(-retrieval[row], count - 1)[:count] if count else np.zeros(0, np.int64)
            pool = pool[np.argsort(-retrieval[row, pool], kind="stable")]
            in_pool = set(pool.tolist())
            extra = [model.item_index[i] for i in request.covisit
                     if i in model.item_index and model.item_index[i] not in in_pool]
            candidates = np.concatenate([pool, np.asarray(extra, dtype=np.int64)])
            pool_scores = np.concatenate([retrieval[row, pool].astype(np.float32), np.zeros(len(extra), np.float32)])
            context = model.context_features(item_ids[candidates].tolist(), pool_scores, request.time)
            image = np.zeros((len(candidates), model.image_dim), np.float32)
            probabilities = model.score(users[row], None, vectors[candidates], text[candidates], image, context)
            position = {int(item): n for n, item in enumerate(candidates.tolist())}
            order = rerank(probabilities.astype(np.float32), vectors[candidates], K, settings.diversity,
                           retrieval=np.concatenate([pool_scores[:len(pool)], np.full(len(extra), -np.inf, np.float32)]),
                           rank_pool=model.rank_pool,
                           covisit=[position[model.item_index[i]] for i in request.covisit
                                    if model.item_index.get(i, 0) in position],
                           covisit_weight=weight)
            scores[request.worker].update(item_ids[candidates[order]].tolist(), request.target)
    return scores


async def publish_catalogue(stacks: dict[str, Settings], items: list[CatalogItem]) -> None:
    for settings in stacks.values():
        async with RecordingPublisher(settings) as publisher:
            for item in items:
                await publisher.publish(item)
            await publisher.settle()


def served_version(worker: WorkerProcess) -> str:
    """The model version a worker reports (``streamrec_model_info``), or "unknown"."""
    try:
        text = worker.metrics_text()
    except OSError:
        return "unknown"
    return text.partition('streamrec_model_info{version="')[2].partition('"')[0] or "unknown"


def indexed_items(worker: WorkerProcess) -> float:
    """Catalogue events this worker has finished with; -1 when a busy worker does not answer in time."""
    try:
        return (worker.metric("streamrec_events_processed_total", {"topic": "catalog"})
                + worker.metric("streamrec_deadletter_total"))
    except OSError:
        return -1.0


def wait_catalogue(workers: dict[str, WorkerProcess], count: int) -> None:
    for name, worker in workers.items():
        done = wait_for(lambda w=worker: indexed_items(w) >= count, timeout_s=3600.0, interval_s=0.5,
                        progress=lambda w=worker: indexed_items(w), stall_s=180.0)
        if not done:
            raise StreamrecError(f"{name} worker did not index the {count} catalogue items")


def plot_curves(evaluation: Evaluation, path: Path, title: str) -> None:
    plot_cumulative({f"{method} ({evaluation.scores[method].hit_rate:.4f})": evaluation.scores[method].cumulative_hr
                     for method in METHODS}, path, title, xlabel="scored interactions")


# -- entry point ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("prequential", __doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="interaction file (s3rec); ml100k defaults to the recbole copy")
    parser.add_argument("--format", choices=("s3rec", "ml100k"), default="ml100k", dest="data_format")
    parser.add_argument("--users", type=int, default=None, help="users to replay (a seeded sample; default all)")
    parser.add_argument("--max-per-user", type=int, default=None,
                        help="keep only each user's first N interactions (quick runs)")
    parser.add_argument("--warmup-fraction", type=float, default=0.5)
    parser.add_argument("--artefact", type=Path, default=None, help="trained model directory to serve")
    parser.add_argument("--train-minutes", type=float, default=None,
                        help="first train a model on the warm-up prefixes only (never on a scored "
                             "interaction) and serve it; the budget in minutes")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of cumulative HR@10")
    parser.add_argument("--partitions", type=int, default=None,
                        help="partitions per topic of the two stacks (default: STREAMREC_PARTITIONS); "
                             "long replays on the embedded broker run faster with more (docs/prequential.md)")
    parser.add_argument("--offline-check", action="store_true",
                        help="also rank the same requests with the served artefact's networks offline "
                             "(offline_*_hr@10): the replay should match them")
    args = parser.parse_args(argv)

    replay_data = load_replay(args.data_format, args.data, args.users, args.seed, args.max_per_user)
    interactions = replay_order(replay_data.sequences, replay_data.timestamps, args.warmup_fraction)
    catalogue = Catalogue([item.item_id for item in replay_data.catalogue])
    print(f"prequential: {len(replay_data.sequences)} users, {len(interactions)} interactions "
          f"({sum(i.scored for i in interactions)} scored), {len(catalogue)} items", flush=True)
    base = load_settings()
    wall_started = time.monotonic()
    if args.artefact is not None and args.train_minutes is not None:
        raise ConfigError("give --artefact or --train-minutes, not both")
    with work_dir(args.work_dir, "prequential") as folder:
        overrides: dict[str, object] = {} if args.partitions is None else {"partitions": args.partitions}
        if args.train_minutes is not None:
            args.artefact = train_on_warmup(args.data_format, args.data, args.warmup_fraction, args.max_per_user,
                                            args.train_minutes, folder / "warmup-model")
        covisit_weight: float | None = None
        if args.artefact is not None:
            from model.serving.trained import TrainedModel

            overrides["model_dir"] = private_model_dir(base, args.artefact, folder / "models")
            # Read now: without --work-dir a trained artefact lives in ``folder``, gone after this block.
            covisit_weight = fusion_weight(base.covisit_weight, TrainedModel(args.artefact))
        broker = start_broker(folder)
        workers: dict[str, WorkerProcess] = {}
        try:
            stacks = {name: stack_settings(base, broker, folder / name, f"preq-{name}", **overrides)
                      for name in ("online", "frozen")}
            for name, settings in stacks.items():
                # A kept --work-dir may hold a store from an earlier run (other model, other events).
                shutil.rmtree(settings.data_dir, ignore_errors=True)
                asyncio.run(ensure_topics(settings))
                workers[name] = WorkerProcess(settings, log_path=folder / f"{name}-worker.log").start()
            for worker in workers.values():  # both start at once; their start-up is seconds of imports
                worker.wait_ready(300.0)
            asyncio.run(publish_catalogue(stacks, replay_data.catalogue))
            wait_catalogue(workers, len(replay_data.catalogue))
            catalogue_s = time.monotonic() - wall_started
            print(f"  catalogue indexed by both workers in {catalogue_s:.0f}s", flush=True)
            replay_started = time.monotonic()
            evaluation = asyncio.run(replay(interactions, stacks, workers, catalogue, args.seed))
            replay_s = time.monotonic() - replay_started
            model_version = served_version(workers["online"])
        finally:
            for worker in workers.values():
                worker.stop()
            broker.stop()
        offline = None
        if args.offline_check:
            if args.artefact is None:
                raise ConfigError("--offline-check needs a trained model (--artefact or --train-minutes)")
            print("ranking the same requests offline with the artefact's networks ...", flush=True)
            offline = offline_replay(args.artefact, interactions, stacks["online"])
    if args.plot is not None:
        name = args.data.stem if args.data else args.data_format
        plot_curves(evaluation, args.plot, f"prequential HR@10, {name}, {len(replay_data.sequences)} users")
    result: dict[str, object] = {}
    for method in METHODS:
        result[f"{method}_hr@10"] = round(evaluation.scores[method].hit_rate, 4)
    for method in METHODS:
        result[f"{method}_ndcg@10"] = round(evaluation.scores[method].ndcg, 4)
    result.update({
        "events": evaluation.events,
        "scored": evaluation.scores["online"].count,
        "users": len(replay_data.sequences),
        "items": len(catalogue),
        "failed_requests": evaluation.failed_requests,
        "model_version": model_version,
        "catalogue_seconds": round(catalogue_s, 1),
        "replay_seconds": round(replay_s, 1),
        "waiting_seconds": round(evaluation.waiting_s, 1),
        "asking_seconds": round(evaluation.asking_s, 1),
        "publishing_seconds": round(evaluation.publishing_s, 1),
        "partitions": args.partitions if args.partitions is not None else base.partitions,
        "plot": str(args.plot) if args.plot else None,
    })
    if covisit_weight is not None:
        result["covisit_weight"] = covisit_weight
    if offline is not None:
        for name, score in offline.items():
            result[f"offline_{name}_hr@10"] = round(score.hit_rate, 4)
            result[f"offline_{name}_ndcg@10"] = round(score.ndcg, 4)
    report("prequential evaluation (HTTP /recommend, k=10, seen items excluded)", result)
    return 0
