"""``streamrec bench encode``: the user tower and the text tower, before and after batching by length.

No broker and no worker: each part times the serving code in this process,
the old way and the new way, on the same inputs, and checks they agree.

* users: ``--users`` users through the served model's user tower (the
  promoted model, or ``--model DIR``), in calls of ``USER_CHUNK`` users, first
  every call at the full length L (as ``stream.users.user_vectors`` did), then
  length-sorted and trimmed (``user_vectors_by_length``). Lengths are those of
  real users (the Amazon Toys sequences, capped at L) and, for comparison,
  uniform in 1..L. Item vectors are random: the cost does not depend on them.
* text: catalogue texts of the real MovieLens films (title, first genre and
  IMDb plot, as the content model reads them; and titles alone, as a trained
  model reads them) through the text tower in batches of 32, first in file
  order (as ``TextEncoder.encode`` did), then in order of token count.
* ``--int8``: the text tower quantised with ``quantize_dynamic`` (int8
  weights), against fp32 on the same texts: cosine, top-10 retrieval overlap
  (each title as a query over the catalogue texts) and items/s.

``--write-catalogue FILE`` writes the same films as a ``streamrec load-catalogue``
file instead (the input of the bulk-load figures in docs/performance.md).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import bench_parser, report
from core.events import CatalogItem, ImageRef
from core.settings import load_settings
from core.text import CONTENT_TEXT_FIELDS, TRAINED_TEXT_FIELDS
from model.serving.content import DEFAULT_BATCH_SIZE, TEXT_SIDECAR, TextEncoder
from model.serving.contract import ACTION_CODE, ServingModel
from model.serving.runtime import file_sha256
from model.serving.user_batches import user_vectors_by_length
from stream.services import exported_towers, load_serving_model
from stream.users import USER_CHUNK

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOYS = SHARED_DATA / "amazon" / "Toys_and_Games.txt"
FILMS = SHARED_DATA / "movielens-posters" / "items.json"
FILMS_LISTED_AT = 874_724_710.0  # before the first MovieLens rating


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call allocations are not what a worker pays
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return float(np.median(timings))


# -- user tower -------------------------------------------------------------------------


def real_lengths(cap: int) -> np.ndarray:
    """Sequence lengths of the Amazon Toys users, capped at ``cap``."""
    if not TOYS.exists():
        raise SystemExit(f"{TOYS} is absent: the real sequence lengths come from there")
    with TOYS.open() as handle:
        return np.minimum([len(line.split()) - 1 for line in handle if line.strip()], cap)


def user_inputs(model: ServingModel, lengths: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, d) table, (B, L) left-padded rows and actions for users of the given lengths."""
    rng = np.random.default_rng(seed)
    length = model.max_sequence
    table = rng.standard_normal((5001, model.fused_dim)).astype(np.float32)
    table[0] = 0.0
    rows = np.zeros((len(lengths), length), np.int64)
    actions = np.zeros((len(lengths), length), np.int64)
    codes = np.array([ACTION_CODE[a] for a in ("view", "click", "add_to_cart", "purchase")])
    for user, used in enumerate(lengths):
        rows[user, length - used:] = rng.integers(1, len(table), used)
        actions[user, length - used:] = rng.choice(codes, used)
    return table, rows, actions


def full_length(model: ServingModel, table: np.ndarray, rows: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The old path: every call of ``USER_CHUNK`` users at the full length."""
    return np.concatenate([
        model.user_vectors(table[rows[start:start + USER_CHUNK]], actions[start:start + USER_CHUNK])
        for start in range(0, len(rows), USER_CHUNK)
    ])


def time_user_tower(model: ServingModel, lengths: np.ndarray, repeats: int, seed: int) -> dict[str, float]:
    table, rows, actions = user_inputs(model, lengths, seed)
    before = median_seconds(lambda: full_length(model, table, rows, actions), repeats)
    after = median_seconds(lambda: user_vectors_by_length(model, table, rows, actions, USER_CHUNK), repeats)
    difference = np.abs(full_length(model, table, rows, actions)
                        - user_vectors_by_length(model, table, rows, actions, USER_CHUNK)).max()
    return {"mean_length": float(lengths.mean()), "full_ms": 1e3 * before, "grouped_ms": 1e3 * after,
            "speedup": before / after, "max_abs_diff": float(difference)}


# -- text tower -------------------------------------------------------------------------


def films(limit: int | None, *, posters: bool) -> list[CatalogItem]:
    """The MovieLens films as catalogue items; ``posters``: photos as URIs under the posters folder."""
    if not FILMS.exists():
        raise SystemExit(f"{FILMS} is absent: the real titles come from there")
    items = []
    for film in json.loads(FILMS.read_text())[:limit]:
        genres = film.get("genres") or []
        poster = film.get("poster") if posters else None
        items.append(CatalogItem(
            event_id=f"film-{film['item_id']}", event_time=FILMS_LISTED_AT, item_id=f"m{film['item_id']}",
            title=film["title"], category=genres[0] if genres else "", description=film.get("description") or "",
            attributes={"genres": " ".join(genres)}, image=ImageRef(image_uri=poster) if poster else None,
        ))
    return items


def in_file_order(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    """The old path: batches of 32 in the order given (one encode call per batch pads the same)."""
    return np.concatenate([encoder.encode(texts[start:start + DEFAULT_BATCH_SIZE])
                           for start in range(0, len(texts), DEFAULT_BATCH_SIZE)])


def padding_share(encoder: TextEncoder, texts: list[str], by_length: bool) -> float:
    """Padding tokens / all tokens fed, batches of 32 in file order or in order of length."""
    lengths = encoder.tokenize(texts)[1].sum(axis=1)  # (N,) tokens per text
    order = np.argsort(lengths, kind="stable") if by_length else np.arange(len(texts))
    batches = [lengths[order[start:start + DEFAULT_BATCH_SIZE]] for start in range(0, len(texts), DEFAULT_BATCH_SIZE)]
    fed = sum(len(batch) * int(batch.max()) for batch in batches)
    return 1.0 - int(lengths.sum()) / fed


def time_text_tower(encoder: TextEncoder, texts: list[str], repeats: int) -> dict[str, float]:
    before = median_seconds(lambda: in_file_order(encoder, texts), repeats)
    after = median_seconds(lambda: encoder.encode(texts), repeats)
    tokens = float(encoder.tokenize(texts)[1].sum())
    return {
        "texts": len(texts),
        "file_order_items_per_s": len(texts) / before,
        "by_length_items_per_s": len(texts) / after,
        # The tower's cost grows with the tokens it reads: what 1,000 items/s would ask of it.
        "mean_tokens": tokens / len(texts),
        "by_length_tokens_per_s": tokens / after,
        "speedup": before / after,
        "padding_share_file_order": padding_share(encoder, texts, by_length=False),
        "padding_share_by_length": padding_share(encoder, texts, by_length=True),
        "max_abs_diff": float(np.abs(in_file_order(encoder, texts) - encoder.encode(texts)).max()),
    }


def int8_text_encoder(text_dir: Path, folder: Path) -> TextEncoder:
    """A copy of the exported text tower with int8 weights (dynamic quantisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(text_dir, folder, dirs_exist_ok=True)
    meta = json.loads((folder / TEXT_SIDECAR).read_text())
    target = folder / "text_tower.int8.onnx"
    quantize_dynamic(str(folder / meta["onnx_file"]), str(target), weight_type=QuantType.QInt8)
    meta.update(onnx_file=target.name, sha256=file_sha256(target))
    (folder / TEXT_SIDECAR).write_text(json.dumps(meta))
    return TextEncoder.from_dir(folder)


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ corpus.T), axis=1)[:, :k]


def compare_int8(encoder: TextEncoder, titles: list[str], texts: list[str], repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="streamrec-int8-") as folder:
        quantised = int8_text_encoder(exported_towers(load_settings()) / "text", Path(folder))
        fp32_texts, int8_texts = encoder.encode(texts), quantised.encode(texts)
        fp32_titles, int8_titles = encoder.encode(titles), quantised.encode(titles)
        cosine = np.einsum("ij,ij->i", fp32_texts, int8_texts)
        fp32_top, int8_top = top_k(fp32_titles, fp32_texts, 10), top_k(int8_titles, int8_texts, 10)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fp32_top, int8_top)])
        seconds = median_seconds(lambda: quantised.encode(texts), repeats)
        return {
            "int8_cosine_mean": float(cosine.mean()),
            "int8_cosine_p1": float(np.percentile(cosine, 1)),
            "int8_cosine_min": float(cosine.min()),
            "int8_top10_overlap": float(overlap),
            "int8_top1_same": float(np.mean(fp32_top[:, 0] == int8_top[:, 0])),
            "int8_items_per_s": len(texts) / seconds,
        }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("encode", __doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained artefact folder for the user tower (default: the served model)")
    parser.add_argument("--users", type=int, default=256, help="users per user-tower batch")
    parser.add_argument("--texts", type=int, default=None, help="films to embed (default: all 1,682)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--int8", action="store_true", help="also measure an int8 copy of the text tower")
    parser.add_argument("--write-catalogue", type=Path, default=None, metavar="FILE",
                        help="only write the films as a `streamrec load-catalogue` file, and stop")
    parser.add_argument("--posters", action="store_true",
                        help=f"with --write-catalogue: posters as image URIs (set STREAMREC_IMAGE_ROOT={FILMS.parent})")
    args = parser.parse_args(argv)
    if args.write_catalogue is not None:
        lines = [item.model_dump_json(exclude_none=True) for item in films(args.texts, posters=args.posters)]
        args.write_catalogue.write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} films written to {args.write_catalogue}")
        return 0
    settings = load_settings()
    if args.model is not None:
        from model.serving.trained import TrainedModel

        model: ServingModel = TrainedModel(args.model, threads=settings.onnx_threads)
    else:
        model = load_serving_model(settings)
    rng = np.random.default_rng(args.seed)
    real = rng.choice(real_lengths(model.max_sequence), args.users)
    uniform = rng.integers(1, model.max_sequence + 1, args.users)
    result: dict[str, object] = {"model": model.version, "users": args.users, "length": model.max_sequence}
    for name, lengths in (("real", real), ("uniform", uniform)):
        result.update({f"users_{name}_{key}": value
                       for key, value in time_user_tower(model, lengths, args.repeats, args.seed).items()})

    encoder = TextEncoder.from_dir(exported_towers(settings) / "text", intra_op_threads=settings.onnx_threads)
    items = films(args.texts, posters=False)
    catalogue = [item.text_for(CONTENT_TEXT_FIELDS) for item in items]
    titles = [item.text_for(TRAINED_TEXT_FIELDS) for item in items]
    for name, texts in (("catalogue", catalogue), ("titles", titles)):
        result.update({f"text_{name}_{key}": value
                       for key, value in time_text_tower(encoder, texts, max(1, args.repeats // 2)).items()})
    if args.int8:
        result.update(compare_int8(encoder, titles, catalogue, max(1, args.repeats // 2)))
    report("user tower and text tower, before / after batching by length", result)
    return 0
