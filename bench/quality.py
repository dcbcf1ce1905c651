"""``streamrec bench quality``: offline leave-one-out quality beside the published numbers.

    streamrec bench quality --data FILE [--format s3rec|ml100k] [--protocol full|sampled]
                            [--model pop|pop-all|trained] [--artefact DIR]
                            [--diversity-sweep] [--plot PATH]
    streamrec bench quality --interactions FILE --catalogue FILE --image-root DIR
                            [--catalogue-fields category=genres,image=poster] ...
    streamrec bench quality --interactions ... --ablation [--minutes M] [--cold-share 0.1] [--plot PATH]

Prints a table, then as its last line one JSON object with the metrics. A trained
model is measured as a worker serves it: retrieval, the ranker, then the co-visit
fusion (from a table of the requests' inputs alone; ``networks_*`` are the figures
before it, ``retrieval_*`` those of the retrieval stage).
``pop-all`` counts popularity over every interaction, test items included: it
leaks the target and exists only to check this protocol against the published
PopRec row; ``pop`` counts training items only and is the fair baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError, StreamrecError
from model.training.data import (
    FORMATS,
    InteractionData,
    add_table_arguments,
    item_counts,
    leave_one_out,
    read_data,
)
from model.training.evaluate import (
    MODELS,
    PROTOCOLS,
    attribute_space,
    diversity,
    diversity_sweep,
    evaluate_popularity,
    evaluate_trained,
)

# HR@10 / NDCG@10 on exactly these files. Full ranking: the all-item table of the
# RUCAIBox/CIKM2020-S3Rec repository; sampled (99 negatives): the S3-Rec paper
# (Zhou et al., CIKM 2020), Table 2.
PUBLISHED_SOURCE = {
    "full": "RUCAIBox/CIKM2020-S3Rec repository, all-item ranking table",
    "sampled": "S3-Rec paper (Zhou et al., CIKM 2020), 99 sampled negatives",
}
PUBLISHED: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "full": {
        "Sports_and_Outdoors": {
            "PopRec": (0.0094, 0.0053), "GRU4Rec": (0.0204, 0.0110), "Caser": (0.0194, 0.0097),
            "BERT4Rec": (0.0191, 0.0099), "SASRec": (0.0350, 0.0192), "S3-Rec": (0.0385, 0.0204),
        },
        "Toys_and_Games": {
            "PopRec": (0.0113, 0.0061), "GRU4Rec": (0.0176, 0.0084), "Caser": (0.0270, 0.0141),
            "BERT4Rec": (0.0203, 0.0099), "SASRec": (0.0675, 0.0374), "S3-Rec": (0.0700, 0.0376),
        },
    },
    "sampled": {
        "Sports_and_Outdoors": {"SASRec": (0.4622, 0.2869), "S3-Rec": (0.5614, 0.3538)},
        "Toys_and_Games": {"SASRec": (0.4663, 0.3136)},
    },
}
METRIC_COLUMNS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


def published_rows(dataset: str, protocol: str) -> dict[str, tuple[float, float]]:
    return PUBLISHED.get(protocol, {}).get(dataset, {})


def format_table(dataset: str, protocol: str, label: str, result: dict[str, Any]) -> str:
    lines = [f"{dataset} — {protocol} ranking, test split, {result['n_users']} users"]
    lines.append(f"{'model':<22}" + "".join(f"{column:>10}" for column in METRIC_COLUMNS))
    for name, (hr, ndcg) in published_rows(dataset, protocol).items():
        lines.append(f"{name + ' (published)':<22}{hr:>10.4f}{ndcg:>10.4f}{'':>10}{'':>10}")
    if "retrieval_hr@10" in result:
        values = [result[f"retrieval_{column}"] for column in METRIC_COLUMNS]
        lines.append(f"{'retrieval only':<22}" + "".join(f"{v:>10.4f}" for v in values))
    lines.append(f"{label:<22}" + "".join(f"{result[column]:>10.4f}" for column in METRIC_COLUMNS))
    lines.append(
        f"intra-list diversity@10 {result['intra_list_diversity']:.4f}, "
        f"catalogue coverage@10 {result['coverage']:.4f}"
    )
    if published_rows(dataset, protocol):
        lines.append(f"published rows: {PUBLISHED_SOURCE[protocol]}")
    return "\n".join(lines)


def format_sweep(rows: list[dict[str, float]]) -> str:
    lines = ["MMR diversity sweep over each final top-50 (trade-off 1.0 = relevance only)"]
    lines.append(f"{'trade-off':>10}{'hr@10':>10}{'ndcg@10':>10}{'ILD@10':>10}{'coverage':>10}")
    for row in rows:
        lines.append(
            f"{row['trade_off']:>10.2f}{row['hr@10']:>10.4f}{row['ndcg@10']:>10.4f}"
            f"{row['intra_list_diversity']:>10.4f}{row['coverage']:>10.4f}"
        )
    return "\n".join(lines)


def plot_result(path: Path, dataset: str, protocol: str, label: str, result: dict[str, Any]) -> None:
    """Bar chart: HR@10 and NDCG@10 of the published rows and of this run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = dict(published_rows(dataset, protocol))
    rows[f"{label} (this run)"] = (result["hr@10"], result["ndcg@10"])
    names = list(rows)
    positions = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(names)), 4.0))
    colours = ["#9aa5b1"] * (len(names) - 1) + ["#d1495b"]
    axis.bar(positions - 0.2, [rows[n][0] for n in names], 0.4, label="HR@10", color=colours)
    axis.bar(positions + 0.2, [rows[n][1] for n in names], 0.4, label="NDCG@10", color=colours, alpha=0.55)
    axis.set_xticks(positions, names, rotation=20, ha="right")
    axis.set_ylabel("metric value")
    axis.set_title(f"{dataset}, {protocol} ranking (left bar HR@10, right bar NDCG@10)")
    if published_rows(dataset, protocol):
        figure.text(0.01, 0.01, f"published: {PUBLISHED_SOURCE[protocol]}", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sweep_plot_path(plot: Path) -> Path:
    return plot.with_name(f"{plot.stem}-diversity{plot.suffix or '.png'}")


def plot_sweep(path: Path, dataset: str, rows: list[dict[str, float]]) -> None:
    """HR@10 against intra-list diversity, one point per MMR trade-off, labelled with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    diversities = [row["intra_list_diversity"] for row in rows]
    hit_rates = [row["hr@10"] for row in rows]
    axis.plot(diversities, hit_rates, marker="o", color="#d1495b")
    for row in rows:
        axis.annotate(f"{row['trade_off']:.2f}", (row["intra_list_diversity"], row["hr@10"]),
                      textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.set_xlabel("intra-list diversity@10 (mean pairwise content distance)")
    axis.set_ylabel("HR@10")
    axis.set_title(f"{dataset}: HR@10 vs diversity (labels: MMR trade-off)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(
    data: InteractionData,
    protocol: str,
    model_name: str,
    artefact: Path | None,
    sweep: bool,
    seed: int = 0,
    int8: bool = False,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Evaluate on the test split; returns the JSON result and the optional sweep rows."""
    split = leave_one_out(data)
    space = attribute_space(data)
    train_seconds = 0.0
    extra: dict[str, float] = {}
    if model_name == "trained":
        if artefact is None:
            raise ConfigError("--model trained needs --artefact DIR")
        from model.serving.trained import TrainedModel

        model = TrainedModel(artefact, int8=int8)
        trained_on = model.manifest.get("data", {}).get("dataset")
        if trained_on != data.name or model.n_items != data.n_items:
            raise ConfigError(f"artefact {artefact} was trained on {trained_on!r}, not on {data.name!r}")
        evaluation = evaluate_trained(model, data, split, "test", protocol, seed, covisits=True)
        train_seconds = float(model.manifest.get("train_seconds", 0.0))
        extra["train_cpu_seconds"] = float(model.manifest.get("train_cpu_seconds", 0.0))
    else:
        # "Training" a popularity model is counting; time just that.
        started = time.monotonic()
        item_counts(split.full if model_name == "pop-all" else split.train, data.n_items)
        train_seconds = time.monotonic() - started
        evaluation = evaluate_popularity(data, split, "test", protocol, model_name, seed)
    result: dict[str, Any] = {
        "dataset": data.name,
        "protocol": protocol,
        "model": model_name + ("-int8" if int8 and model_name == "trained" else ""),
        **{column: round(evaluation.metrics[column], 5) for column in METRIC_COLUMNS},
        "n_users": len(split.test),
        "train_seconds": round(train_seconds, 3),
        **{key: round(value, 5) for key, value in diversity(evaluation, space, data.n_items).items()},
        **{key: round(value, 5) for key, value in evaluation.extra.items()},
        **extra,
    }
    rows = diversity_sweep(evaluation, split.test, space, data.n_items) if sweep else []
    return result, rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec bench quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="interaction file (optional for ml100k)")
    parser.add_argument("--format", choices=FORMATS, default="s3rec", dest="data_format")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="full")
    parser.add_argument("--model", choices=MODELS, default="pop", dest="model_name")
    parser.add_argument("--artefact", type=Path, help="trained artefact directory (for --model trained)")
    parser.add_argument("--diversity-sweep", action="store_true", help="MMR trade-off sweep on the final lists")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart beside the published rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives")
    parser.add_argument("--int8", action="store_true", help="serve the artefact's int8 copies (model.export.fused --int8)")
    add_table_arguments(parser)
    parser.add_argument("--ablation", action="store_true",
                        help="train behaviour / +text / +image / all three and compare them (bench.ablation)")
    parser.add_argument("--cold-share", type=float, default=0.1,
                        help="--ablation: share of items (newest by first interaction) held out of training")
    parser.add_argument("--minutes", type=float, default=None, help="--ablation: wall-clock budget per variant")
    parser.add_argument("--epochs", type=int, default=None,
                        help="--ablation: epochs per variant (the same for all: a fair comparison on a busy machine)")
    parser.add_argument("--threads", type=int, default=2, help="--ablation: torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        data, args.data_format, args.data = read_data(args)
        if args.ablation:
            from bench.ablation import main_ablation

            return main_ablation(data, args)
        result, sweep_rows = run(
            data, args.protocol, args.model_name, args.artefact, args.diversity_sweep, args.seed, args.int8
        )
    except StreamrecError as error:
        print(f"streamrec bench quality: {error}", file=sys.stderr)
        return 2
    print(format_table(data.name, args.protocol, args.model_name, result))
    if sweep_rows:
        print(format_sweep(sweep_rows))
        result["diversity_sweep"] = [{k: round(v, 5) for k, v in row.items()} for row in sweep_rows]
    if args.plot is not None:
        plot_result(args.plot, data.name, args.protocol, args.model_name, result)
        print(f"plot written to {args.plot}")
        if sweep_rows:
            plot_sweep(sweep_plot_path(args.plot), data.name, sweep_rows)
            print(f"diversity sweep plot written to {sweep_plot_path(args.plot)}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
