"""``streamrec bench quality --ablation``: what text, photos and behaviour are each worth.

Trains the retrieval towers four times on the same split (behaviour only,
+ text, + image, all three; ``model.training.ablation``), evaluates them on all
test users and on the cold-item split, beside untrained content baselines
(text-only, image-only, the rule model a worker serves before training, and
random), then measures visual search with each photo and a crop of it.
Prints a table, then one JSON line; ``--plot`` writes a PNG.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from model.export.towers import encoder_identities
from model.nets.towers import TowerConfig
from model.serving.contract import ACTION_CODE
from model.training.ablation import run_ablation, visual_search
from model.training.content_vectors import (
    check_towers,
    content_vectors,
    default_towers_dir,
)
from model.training.data import InteractionData
from model.training.train import FORMAT_ACTION, FORMAT_RETRIEVAL, FORMAT_TOWER


def format_ablation(result: dict[str, Any]) -> str:
    header = (f"{result['dataset']}: {result['all_test_users']} test users (leave-one-out, full ranking over the "
              f"training items, history excluded); cold split: {result['cold_items']} items "
              f"(newest {result['cold_share']:.0%} by first interaction) held out of training, "
              f"{result['cold_test_users']} users' first interaction with one of them")
    columns = (f"{'model':<28}{'all HR@10':>10}{'all NDCG':>10}{'+new HR@10':>11}{'+new NDCG':>10}"
               f"{'cold HR@10':>11}{'cold NDCG':>10}{'new HR@10':>10}{'new NDCG':>10}")
    lines = [header, columns]

    def cells(row: dict[str, Any], key: str) -> str:
        if key not in row:
            return f"{'':>10}{'':>10}"
        return f"{row[key]['hr@10']:>10.4f}{row[key]['ndcg@10']:>10.4f}"

    for name, row in result["variants"].items():
        lines.append(f"{name:<28}{cells(row, 'all_users')} {cells(row, 'all_users_with_new')} "
                     f"{cells(row, 'cold')}{cells(row, 'cold_among_new')}")
    for name, row in result["baselines"].items():
        lines.append(f"{name:<28}{cells(row, 'all_users')} {cells(row, 'all_users_with_new')} "
                     f"{cells(row, 'cold')}{cells(row, 'cold_among_new')}")
    lines.append("+new: all users against the training items and the held-out items listed by then; cold: the "
                 "target ranked against every item listed by then; new: against the held-out (new) items listed "
                 "by then")
    search = result.get("visual_search")
    if search:
        lines.append(
            f"visual search over {search['photos']} photos (top 10): same item — poster "
            f"{search['poster']['same_item_in_top10']:.4f}, centre crop ({search['crop_share']:.0%}) "
            f"{search['crop']['same_item_in_top10']:.4f}; share of the other 10 that share a category — "
            f"poster {search['poster']['same_category_share_of_top10']:.4f}, crop "
            f"{search['crop']['same_category_share_of_top10']:.4f}, random {search['random_same_category_share']:.4f}; "
            f"at least one — poster {search['poster']['any_same_category_in_top10']:.4f}, crop "
            f"{search['crop']['any_same_category_in_top10']:.4f}, random {search['random_any_same_category']:.4f}"
        )
    return "\n".join(lines)


def plot_ablation(path: Path, result: dict[str, Any]) -> None:
    """HR@10 per model: all users and all users with the new items listed (variants only), cold split,
    cold among new items."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**result["variants"], **result["baselines"]}
    names = list(rows)
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for axis, key, title in zip(axes, ("all_users", "all_users_with_new", "cold", "cold_among_new"),
                                ("all test users", "all test users, new items listed", "cold items vs every item",
                                 "cold items vs new items")):
        shown = [name for name in names if key in rows[name]]
        values = [rows[name][key]["hr@10"] for name in shown]
        colours = ["#d1495b" if name == "all three" else "#9aa5b1" if name in result["variants"] else "#4f6d7a"
                   for name in shown]
        axis.barh(range(len(shown)), values, color=colours)
        axis.set_yticks(range(len(shown)), shown, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("HR@10")
        axis.set_title(title, fontsize=10)
    figure.suptitle(f"{result['dataset']}: modality ablation (red: all three; grey: other variants; "
                    "blue: untrained baselines)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main_ablation(data: InteractionData, args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    towers_dir = args.towers or default_towers_dir()
    check_towers(towers_dir, encoder_identities())
    started = time.monotonic()
    content = content_vectors(data, towers_dir, args.cache_dir)
    encode_seconds = time.monotonic() - started
    data_format = args.data_format if args.data_format in FORMAT_TOWER else "table"
    settings = FORMAT_RETRIEVAL["table"]
    settings = replace(settings, minutes=args.minutes if args.minutes is not None else settings.minutes,
                       epochs=args.epochs if args.epochs is not None else settings.epochs,
                       train_action=ACTION_CODE[data.action or FORMAT_ACTION[data_format]], seed=args.seed + 42)
    config = TowerConfig(n_items=data.n_items, n_attributes=data.n_attributes,
                         max_attributes=data.attributes.shape[1], text_dim=content.text.shape[1],
                         image_dim=content.image.shape[1], **FORMAT_TOWER["table"])
    result = run_ablation(data, content, config, settings, towers_dir, args.cache_dir, args.cold_share)
    if content.has_image.any():
        result["visual_search"] = visual_search(data, content, towers_dir, args.cache_dir)
    result["content_seconds"] = round(encode_seconds, 1)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["settings"] = {"minutes_per_variant": settings.minutes, "epochs": settings.epochs,
                          "id_dropout": settings.id_dropout, "modality_dropout": settings.modality_dropout,
                          "content_loss_weight": settings.content_loss_weight,
                          "content_loss_share": settings.content_loss_share,
                          "text_learning_rate_share": settings.text_learning_rate_share,
                          "threads": torch.get_num_threads()}
    print(format_ablation(result))
    if args.plot is not None:
        plot_ablation(args.plot, result)
        print(f"plot written to {args.plot}")
    print(json.dumps(result))
    return 0
