"""What each modality is worth: the retrieval towers trained with and without text and photos.

Three views, one trained model per variant:

- all users: leave-one-out on the interactions of the items kept for training
  (items[-1] the test target, items[:-1] the input, full ranking over those
  items, history excluded), as ``streamrec bench quality`` does;
- cold items: the newest ``cold_share`` of items by first interaction are held
  out of training entirely (their interactions removed, and never a softmax
  class). Each user's first interaction with one of them is a test case: the
  input is what the user did before it, the target is ranked against every
  item listed by then (an item is listed from its first interaction; held-out
  ones are known by content alone: id row 0), history excluded, and, as a
  second view, against the held-out items listed by then only. Only content
  can place such an item;
- all users with the new items listed: the all-users targets ranked against
  the training items plus the held-out items listed by each test interaction
  (known by content alone). It prices what the cold view rewards: a model
  that ranks every new item first wins the cold view and loses here.

Variants: behaviour (item id + category attributes), + text, + image, all
three. Content baselines on the cold split, with no training: text-only and
image-only similarity (recency-weighted mean of the history's vectors, as the
rule model pools), and the rule model's own item vectors (text of title,
category and description plus the projected photo), which is what a worker
serves before any model is trained; besides, the items in order of listing,
newest first (no content, no user: what the split itself rewards), and
random order.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.text import CONTENT_TEXT_FIELDS, compose_text
from model.nets.towers import TowerConfig, attribute_mixing
from model.serving.contract import CATEGORY_SEPARATOR, KEY_VALUE, ItemContent
from model.training.content_vectors import ContentVectors, encode_texts
from model.training.data import (
    InteractionData,
    LeaveOneOut,
    first_seen,
    leave_one_out,
    left_pad,
    newest_items,
)
from model.training.metrics import exclude_history, ranking_metrics, target_ranks
from model.training.retrieval import (
    Catalogue,
    RetrievalModel,
    RetrievalSettings,
    train_retrieval,
)

VARIANTS: dict[str, tuple[bool, bool]] = {  # name -> (text, image)
    "behaviour": (False, False),
    "+text": (True, False),
    "+image": (False, True),
    "all three": (True, True),
}
K = 10


@dataclass(frozen=True)
class ColdSplit:
    """cold (N+1,) bool; warm: the data without the cold items' interactions;
    histories/targets: one cold test case per user who has one."""

    cold: np.ndarray
    warm: InteractionData
    histories: list[np.ndarray]
    targets: np.ndarray
    times: np.ndarray  # (U,) time of each test interaction
    listed_at: np.ndarray  # (N+1,) first interaction time per item

    def listed(self, among: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        """(U, N+1) bool: the items of ``among`` already listed at each test interaction
        (at ``times`` (U,) instead, where given)."""
        times = self.times if times is None else times
        return among[None, :] & (self.listed_at[None, :] <= times[:, None])


def cold_items(data: InteractionData, share: float) -> np.ndarray:
    """(N+1,) bool: the newest ``share`` of the interacted items by first interaction time."""
    return newest_items(data, share)


def cold_split(data: InteractionData, share: float) -> ColdSplit:
    cold = cold_items(data, share)
    assert data.timestamps is not None
    sequences, timestamps, histories, targets, times = [], [], [], [], []
    for sequence, stamps in zip(data.sequences, data.timestamps):
        is_cold = cold[sequence]
        sequences.append(sequence[~is_cold])
        timestamps.append(stamps[~is_cold])
        if is_cold.any():
            first = int(np.argmax(is_cold))
            if first >= 1:
                histories.append(sequence[:first])
                targets.append(int(sequence[first]))
                times.append(float(stamps[first]))
    warm = replace(data, sequences=sequences, timestamps=timestamps)
    return ColdSplit(cold, warm, histories, np.asarray(targets, dtype=np.int64), np.asarray(times),
                     first_seen(data))


def variant_catalogue(data: InteractionData, content: ContentVectors, use_text: bool, use_image: bool,
                      cold: np.ndarray, listed: np.ndarray) -> Catalogue:
    attributes = torch.from_numpy(data.attributes)
    id_rows = np.where(cold, 0, np.arange(data.n_items + 1))
    return Catalogue(
        attributes=attributes,
        attribute_mixing=attribute_mixing(attributes, data.n_attributes),
        text=torch.from_numpy(content.text) if use_text else None,
        has_text=torch.from_numpy(content.has_text.astype(np.float32)) if use_text else None,
        image=torch.from_numpy(content.image) if use_image else None,
        has_image=torch.from_numpy(content.has_image.astype(np.float32)) if use_image else None,
        id_rows=torch.from_numpy(id_rows),
        listed=torch.from_numpy(listed),
    )


def rank_metrics(users: np.ndarray, items: np.ndarray, histories: list[np.ndarray], targets: np.ndarray,
                 candidates: np.ndarray) -> dict[str, float]:
    """HR/NDCG@10 of dot-product scores: users (U, d), items (N+1, d), candidates (N+1,) or (U, N+1) bool."""
    return score_metrics(users @ items.T, histories, targets, candidates)


def score_metrics(scores: np.ndarray, histories: list[np.ndarray], targets: np.ndarray,
                  candidates: np.ndarray) -> dict[str, float]:
    """HR/NDCG@10 of scores (U, N+1), changed in place: history and non-candidates excluded."""
    exclude_history(scores, histories)
    scores[~np.broadcast_to(candidates, scores.shape)] = -np.inf
    metrics = ranking_metrics(target_ranks(scores, targets), (K,))
    return {name: float(value) for name, value in metrics.items()}


def with_new_items(data: InteractionData, split: ColdSplit, users: np.ndarray, times: np.ndarray,
                   listed_warm: np.ndarray) -> np.ndarray:
    """(U, N+1) bool: the training items plus the held-out items listed by each user's test time,
    less the held-out items that user interacted with before it (history, had it been kept)."""
    assert data.timestamps is not None
    candidates = listed_warm[None, :] | split.listed(split.cold, times)
    for row, (user, time) in enumerate(zip(users, times)):
        sequence, stamps = data.sequences[user], data.timestamps[user]
        seen = sequence[(stamps <= time) & split.cold[sequence]]
        candidates[row, seen] = False
    return candidates


def newest_first_metrics(split: ColdSplit, candidates: np.ndarray) -> dict[str, float]:
    """HR/NDCG@10 of the cold cases with the candidates in order of listing, newest first."""
    scores = np.tile(split.listed_at, (len(split.targets), 1))  # never listed (inf): never a candidate
    return score_metrics(scores, split.histories, split.targets, candidates)


def random_metrics(histories: list[np.ndarray], candidates: np.ndarray) -> dict[str, float]:
    """Expected HR/NDCG@10 of a uniformly random order of the candidates outside the history."""
    hr, ndcg = [], []
    gains = 1.0 / np.log2(np.arange(K) + 2.0)
    candidates = np.broadcast_to(candidates, (len(histories), len(candidates) if candidates.ndim == 1
                                              else candidates.shape[1]))
    for history, row in zip(histories, candidates):
        pool = int(row.sum()) - int(row[np.unique(history)].sum())
        hr.append(min(K, pool) / pool)
        ndcg.append(gains[: min(K, pool)].sum() / pool)
    return {f"hr@{K}": float(np.mean(hr)), f"ndcg@{K}": float(np.mean(ndcg))}


def pooled_users(vectors: np.ndarray, histories: list[np.ndarray], max_len: int = 50) -> np.ndarray:
    """Recency-weighted mean of the history's item vectors (the rule model's pooling), unit length."""
    from model.serving.rule_model import RECENCY_DECAY

    items = left_pad(histories, max_len)  # (U, L)
    weights = (RECENCY_DECAY ** np.arange(max_len - 1, -1, -1))[None, :] * (items > 0)
    pooled = np.einsum("ul,uld->ud", weights, vectors[items])
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def rule_item_vectors(data: InteractionData, content: ContentVectors, towers_dir: Path,
                      cache_dir: Path | None, progress: bool) -> np.ndarray:
    """(N+1, T) the rule model's item vectors: its text (title, category, description) + projected photo."""
    from model.serving.rule_model import RuleModel

    titles = data.titles or [""] * (data.n_items + 1)
    descriptions = data.descriptions or [""] * (data.n_items + 1)
    names = [[data.attribute_names[a - 1] for a in row if a > 0] for row in data.attributes]
    categories = [CATEGORY_SEPARATOR.join(row) for row in names]
    # The rule model's text holds the category, not the ``key=value`` attributes (``CatalogItem.text_for``).
    texts = [compose_text(CONTENT_TEXT_FIELDS, {"title": t, "category": CATEGORY_SEPARATOR.join(
                 name for name in row if "=" not in name), "description": d})
             for t, row, d in zip(titles, names, descriptions)]
    text, has_text = encode_texts(texts, towers_dir, cache_dir, progress)
    has_text[0] = False
    model = RuleModel(towers_dir.parent / "rule", text_dim=text.shape[1], image_dim=content.image.shape[1])
    return model.item_vectors(ItemContent([str(i) for i in range(data.n_items + 1)], text, content.image,
                                          has_text, content.has_image, categories))


@torch.no_grad()
def model_users(model: RetrievalModel, vectors: torch.Tensor, histories: list[np.ndarray], max_len: int,
                action: int) -> np.ndarray:
    items = torch.from_numpy(left_pad(histories, max_len))
    return model.user_tower(vectors[items], torch.where(items > 0, action, 0)).numpy()


def run_ablation(data: InteractionData, content: ContentVectors, config: TowerConfig,
                 settings: RetrievalSettings, towers_dir: Path, cache_dir: Path | None,
                 cold_share: float = 0.1, progress: bool = True,
                 variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Any]:
    """Train every variant on the warm data; metrics on all users and on the cold split."""
    split = cold_split(data, cold_share)
    warm_split: LeaveOneOut = leave_one_out(split.warm)
    listed_warm = ~split.cold
    listed_warm[0] = False
    every_item = np.ones(data.n_items + 1, dtype=bool)
    every_item[0] = False
    listed_cold, listed_new = split.listed(every_item), split.listed(split.cold)
    assert split.warm.timestamps is not None
    test_times = np.asarray([split.warm.timestamps[user][-1] for user in warm_split.users])
    listed_with_new = with_new_items(data, split, warm_split.users, test_times, listed_warm)
    action = settings.train_action
    rows: dict[str, dict[str, Any]] = {}
    for name in variants:
        use_text, use_image = VARIANTS[name]
        train_catalogue = variant_catalogue(data, content, use_text, use_image, split.cold, listed_warm)
        train_catalogue = replace(train_catalogue, newest=torch.from_numpy(
            newest_items(split.warm, settings.content_loss_share)))
        # Without content an unknown item is only its categories: id dropout would just blur ids,
        # and the content-only loss would rank new items by category alone.
        variant_settings = (settings if use_text or use_image
                            else replace(settings, id_dropout=0.0, content_loss_weight=0.0))
        model, report = train_retrieval(config, variant_settings, warm_split, train_catalogue, progress=progress)
        model.eval()
        with torch.no_grad():
            vectors = model.catalogue_vectors(train_catalogue)  # cold items: id row 0, content only
        items = vectors.numpy()
        test_inputs = warm_split.inputs("test")
        test_users = model_users(model, vectors, test_inputs, config.max_sequence, action)
        cold_users = model_users(model, vectors, split.histories, config.max_sequence, action)
        rows[name] = {
            "all_users": rank_metrics(test_users, items, test_inputs, warm_split.test, listed_warm),
            "all_users_with_new": rank_metrics(test_users, items, test_inputs, warm_split.test, listed_with_new),
            "cold": rank_metrics(cold_users, items, split.histories, split.targets, listed_cold),
            "cold_among_new": rank_metrics(cold_users, items, split.histories, split.targets, listed_new),
            "best_epoch": report.best_epoch,
            "train_seconds": round(report.seconds, 1),
        }
    baselines: dict[str, dict[str, Any]] = {}
    spaces = {
        "text similarity": np.where(content.has_text[:, None], content.text, 0.0),
        "image similarity": np.where(content.has_image[:, None], content.image, 0.0),
        "rule model (served today)": rule_item_vectors(data, content, towers_dir, cache_dir, progress),
    }
    for name, space in spaces.items():
        users = pooled_users(space, split.histories)
        baselines[name] = {
            "cold": rank_metrics(users, space, split.histories, split.targets, listed_cold),
            "cold_among_new": rank_metrics(users, space, split.histories, split.targets, listed_new),
        }
    baselines["newest listed first"] = {"cold": newest_first_metrics(split, listed_cold),
                                        "cold_among_new": newest_first_metrics(split, listed_new)}
    baselines["random"] = {"cold": random_metrics(split.histories, listed_cold),
                           "cold_among_new": random_metrics(split.histories, listed_new)}
    return {
        "dataset": data.name,
        "cold_share": cold_share,
        "cold_items": int(split.cold.sum()),
        "cold_test_users": len(split.targets),
        "all_test_users": len(warm_split.test),
        "items_with_text": int(content.has_text.sum()),
        "items_with_image": int(content.has_image.sum()),
        "variants": rows,
        "baselines": baselines,
    }


def share_a_category(attributes: np.ndarray, n_attributes: int) -> np.ndarray:
    """(P, A) attribute indices (0 = empty slot) -> (P, P) bool: two different items share one."""
    multi_hot = np.zeros((len(attributes), n_attributes + 1), dtype=np.float32)
    np.put_along_axis(multi_hot, attributes, 1.0, axis=1)
    multi_hot[:, 0] = 0.0  # slot padding
    shared = (multi_hot @ multi_hot.T) > 0
    np.fill_diagonal(shared, False)
    return shared


def categories_only(attributes: np.ndarray, names: list[str]) -> np.ndarray:
    """(P, A) attribute indices with the ``key=value`` attributes (a release year) emptied:
    "the same genre" is asked of categories alone."""
    categories = np.flatnonzero([KEY_VALUE not in name for name in names]) + 1
    return np.where(np.isin(attributes, categories), attributes, 0)


def visual_search(data: InteractionData, content: ContentVectors, towers_dir: Path, cache_dir: Path | None,
                  crop: float = 0.6, progress: bool = True) -> dict[str, Any]:
    """Query the photo index with each item's photo, and with a centre crop of it.

    Reports how often the item itself is in the top 10, and the share of the
    top 10 other items that share a category (not a ``key=value`` attribute) with it (beside what 10 random
    items give), in the raw image-vector space the worker's visual search uses.
    """
    from model.training.content_vectors import encode_images

    with_photo = np.flatnonzero(content.has_image)
    index = content.image[with_photo]  # (P, I) unit vectors
    images = data.images or [None] * (data.n_items + 1)
    cropped, has_crop = encode_images([images[i] for i in with_photo], towers_dir, cache_dir, progress, crop)
    shared = share_a_category(categories_only(data.attributes[with_photo], data.attribute_names), data.n_attributes)
    result: dict[str, Any] = {"photos": len(with_photo), "crop_share": crop}
    for name, queries in (("poster", index), ("crop", cropped[has_crop])):
        rows = np.arange(len(with_photo))[has_crop] if name == "crop" else np.arange(len(with_photo))
        scores = queries @ index.T  # (Q, P)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        same_item = (top == rows[:, None]).any(axis=1)
        others = np.argsort(-np.where(np.arange(len(with_photo))[None, :] == rows[:, None], -np.inf, scores),
                            axis=1, kind="stable")[:, :K]
        genre_hits = np.take_along_axis(shared[rows], others, axis=1)
        result[name] = {
            "same_item_in_top10": float(same_item.mean()),
            "same_category_share_of_top10": float(genre_hits.mean()),
            "any_same_category_in_top10": float(genre_hits.any(axis=1).mean()),
        }
    others_count = max(len(with_photo) - 1, 1)
    sharing = shared.sum(axis=1)  # (P,) other items sharing a category with each
    result["random_same_category_share"] = float(sharing.mean() / others_count)
    # P(at least one of 10 random other items shares a category) = 1 - C(n - s, 10) / C(n, 10)
    none = np.ones(len(with_photo))
    for j in range(K):
        none *= np.clip((others_count - sharing - j) / (others_count - j), 0.0, 1.0)
    result["random_any_same_category"] = float((1.0 - none).mean())
    return result
