"""Training of the retrieval towers: next-item prediction with full softmax.

The item tower produces the vector of every catalogue item each step; the
user tower reads the vectors of the items seen so far; the logits are the dot
products with every item vector (input and output item vectors are the same
tower, i.e. tied). The loss is cross-entropy at every position of every
training sequence (items[:-2] of each user), early stopping watches NDCG@10 on
the validation item.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.nets.towers import ItemTower, TowerConfig, UserTower
from model.training.data import LeaveOneOut, item_counts, left_pad
from model.training.metrics import exclude_history, ranking_metrics, target_ranks


@dataclass(frozen=True)
class RetrievalSettings:
    """Optimisation hyperparameters of the retrieval towers."""

    epochs: int = 300
    minutes: float = 25.0
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    label_smoothing: float = 0.0
    patience: int = 10
    eval_every: int = 2
    seed: int = 42
    train_action: int = 4
    negatives: int = 0  # 0 = full softmax; else that many shared negatives per step
    negative_power: float = 0.0  # negatives drawn by count ** power (0 = uniform), log-Q corrected
    schedule: str = "cosine"  # or "constant"
    warmup_share: float = 0.03
    # After early stopping: continue on items[:-1] (the newest step), lr = share x learning_rate.
    fine_tune_epochs: int = 3
    fine_tune_lr_share: float = 1.0 / 3.0
    # 0: fine-tune for exactly ``fine_tune_epochs``. > 0: that share of the users keeps its
    # validation step out of the fine-tuning, and the epoch (0 to ``fine_tune_epochs``) whose
    # state ranks their validation items best is kept (``fine_tune_newest``).
    fine_tune_holdout: float = 0.0
    # Per step, the share of items read as unknown (id row 0): content must place them alone,
    # as it must for an item listed after training.
    id_dropout: float = 0.0
    # Per step, the share of items whose text (and, independently, photo) is hidden:
    # the "missing" vectors learn from more than the few items that really lack one.
    modality_dropout: float = 0.0
    # Weight of a second next-item softmax over the newest items alone, each read by its content
    # only (id row 0): a step whose target is among the newest ``content_loss_share`` of the
    # training items by first interaction is also predicted from content, against the other new
    # items, as an item listed after training is served. 0 = off.
    content_loss_weight: float = 0.0
    content_loss_share: float = 0.2
    # The text projection learns at this share of the learning rate: at the full rate the
    # title + plot vector (384-d, one per film) is fitted like a second id and places
    # unseen items worse (tuned on movielens-posters' cold split).
    text_learning_rate_share: float = 1.0


@dataclass(frozen=True)
class Catalogue:
    """Per-item inputs of the item tower for every known item (row 0 = unknown).

    attributes: (N+1, A) int64; attribute_mixing: its sparse mean matrix
    (``towers.attribute_mixing``); text: (N+1, T) float32 or None;
    has_text: (N+1,) float32 or None; image: (N+1, I) float32 or None;
    has_image: (N+1,) float32 or None; id_rows: (N+1,) int64 id row of each
    item (0 = known by content only) or None for its own; listed: (N+1,) bool,
    the items that may be ranked (False: held out of this catalogue) or None;
    newest: (N+1,) bool, the newest training items (``newest_items``), the
    classes of the content-only loss, or None (that loss then covers every item).
    """

    attributes: torch.Tensor
    attribute_mixing: torch.Tensor
    text: torch.Tensor | None = None
    has_text: torch.Tensor | None = None
    image: torch.Tensor | None = None
    has_image: torch.Tensor | None = None
    id_rows: torch.Tensor | None = None
    listed: torch.Tensor | None = None
    newest: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Catalogue:
        """The same catalogue with every tensor on ``device``."""
        moved = {field.name: None if getattr(self, field.name) is None else getattr(self, field.name).to(device)
                 for field in fields(self)}
        return Catalogue(**moved)


class RetrievalModel(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.item_tower = ItemTower(config)
        self.user_tower = UserTower(config)

    def catalogue_vectors(self, catalogue: Catalogue, settings: RetrievalSettings | None = None) -> torch.Tensor:
        """(N+1, d) vectors of every known item; with ``settings`` (training), its dropouts applied."""
        id_rows, has_text, has_image = catalogue.id_rows, catalogue.has_text, catalogue.has_image
        if settings is not None and self.training:
            rows, device = len(catalogue.attributes), catalogue.attributes.device
            if settings.id_dropout > 0:
                own = id_rows if id_rows is not None else torch.arange(rows, device=device)
                id_rows = torch.where(torch.rand(rows, device=device) < settings.id_dropout, 0, own)
            if settings.modality_dropout > 0:
                if has_text is not None:
                    has_text = has_text * (torch.rand(rows, device=device) >= settings.modality_dropout)
                if has_image is not None:
                    has_image = has_image * (torch.rand(rows, device=device) >= settings.modality_dropout)
        return self.item_tower.catalogue_vectors(
            catalogue.attribute_mixing, catalogue.text, has_text, catalogue.image, has_image, id_rows)

    def content_only_vectors(self, catalogue: Catalogue, settings: RetrievalSettings | None = None) -> torch.Tensor:
        """(N+1, d) every item as an unknown one (id row 0): its attributes, text and photo alone."""
        rows = torch.zeros(len(catalogue.attributes), dtype=torch.long, device=catalogue.attributes.device)
        unknown = replace(catalogue, id_rows=rows)
        return self.catalogue_vectors(unknown, settings)


@dataclass
class TrainingReport:
    best_epoch: int
    epochs_run: int
    seconds: float
    validation: dict[str, float]
    history: list[dict[str, float]]


def training_pairs(train_sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (inputs, next-item targets), both (R, max_len) int64.

    A sequence longer than ``max_len`` + 1 is cut into windows ending every
    ``max_len`` steps back from its end, so every transition is trained once.
    """
    inputs, targets = [], []
    for sequence in train_sequences:
        for end in range(len(sequence) - 1, 0, -max_len):
            start = max(0, end - max_len)
            inputs.append(sequence[start:end])
            targets.append(sequence[start + 1 : end + 1])
    return left_pad(inputs, max_len), left_pad(targets, max_len)


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random batches of users with similar sequence lengths.

    Rows are shuffled, then sorted by length within windows of 50 batches, so a
    batch rarely pads short sequences up to one long one; batch order is shuffled.
    """
    order = rng.permutation(len(lengths))
    window = 50 * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


class NegativeSampler:
    """Shared negatives for sampled softmax, drawn in proportion to ``count ** power``.

    power 0 is uniform; with power > 0 popular (hard) items are drawn more and
    every logit is corrected by -log(expected draws), so the loss still
    estimates the full softmax (the usual log-Q correction).
    """

    def __init__(self, item_counts: np.ndarray, draws: int, power: float, device: torch.device | str = "cpu") -> None:
        weights = (item_counts.astype(np.float64) + 1.0) ** power
        weights[0] = 0.0  # never draw the unknown item
        probabilities = torch.from_numpy(weights / weights.sum()).to(device=device, dtype=torch.float32)
        self.draws = draws
        self.probabilities = probabilities  # (N+1,)
        self.log_expected = torch.log(probabilities * draws).clamp(min=-30.0)  # (N+1,)

    def sample(self) -> torch.Tensor:
        return torch.multinomial(self.probabilities, self.draws, replacement=True)


def next_item_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    vectors: torch.Tensor,
    settings: RetrievalSettings,
    sampler: NegativeSampler | None = None,
    unlisted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the next item: hidden (M, d), targets (M,) in 1..N, vectors (N+1, d).

    Full softmax over all N items without a sampler (``unlisted`` (N,) bool:
    items held out of the catalogue, never a class); otherwise over the target
    plus the sampler's shared negatives (draws equal to the target are masked).
    """
    if sampler is None:
        logits = hidden @ vectors[1:].T  # (M, N)
        if unlisted is not None:
            logits = logits.masked_fill(unlisted, -1e9)
        return nn.functional.cross_entropy(logits, targets - 1, label_smoothing=settings.label_smoothing)
    negatives = sampler.sample()  # (K,)
    positive = (hidden * vectors[targets]).sum(dim=-1, keepdim=True)  # (M, 1)
    positive = positive - sampler.log_expected[targets].unsqueeze(1)
    sampled = hidden @ vectors[negatives].T - sampler.log_expected[negatives]  # (M, K)
    sampled = sampled.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -1e9)
    logits = torch.cat([positive, sampled], dim=1)
    labels = torch.zeros(len(targets), dtype=torch.long, device=targets.device)
    return nn.functional.cross_entropy(logits, labels, label_smoothing=settings.label_smoothing)


def content_only_loss(
    model: RetrievalModel,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    catalogue: Catalogue,
    settings: RetrievalSettings,
    unlisted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the next item when every item is known by content alone.

    hidden (B, L, d), targets (B, L), mask (B, L) the predicted positions. Only
    the positions whose target is one of ``catalogue.newest`` count, and the
    classes are the newest items: a new item must win against the other new
    items on content, what a model serving items listed after training is
    asked to do. The user states get this gradient too. Zero when no position
    qualifies.
    """
    content = model.content_only_vectors(catalogue, settings)  # (N+1, d)
    rows, outside = mask, unlisted
    if catalogue.newest is not None:
        rows = mask & catalogue.newest[targets]
        older = ~catalogue.newest[1:]
        outside = older if unlisted is None else unlisted | older
    if not bool(rows.any()):
        return hidden.sum() * 0.0
    return next_item_loss(hidden[rows], targets[rows], content, settings, None, outside)


def learning_rate_factor(settings: RetrievalSettings, progress: float) -> float:
    """Linear warm-up, then cosine decay to zero at ``progress`` 1 (epochs or time, whichever ends first)."""
    if settings.schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if progress < settings.warmup_share:
        return max(progress / settings.warmup_share, 0.01)
    remaining = (progress - settings.warmup_share) / (1.0 - settings.warmup_share)
    return 0.5 * (1.0 + math.cos(math.pi * remaining))


def make_optimizer(model: RetrievalModel, settings: RetrievalSettings, learning_rate: float) -> torch.optim.AdamW:
    """AdamW over both towers; the text projection at ``text_learning_rate_share`` of the rate.

    Each parameter group carries its ``share``; the training loop sets
    lr = share x learning rate x schedule.
    """
    text = list(model.item_tower.text_projection.parameters())
    text_ids = {id(parameter) for parameter in text}
    rest = [parameter for parameter in model.parameters() if id(parameter) not in text_ids]
    groups = [{"params": rest, "share": 1.0}, {"params": text, "share": settings.text_learning_rate_share}]
    for group in groups:
        group["lr"] = group["share"] * learning_rate
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.98))


def _trim_padding(*batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns that are padding in every row (they cost time, change nothing)."""
    used = (batches[0] > 0).any(dim=0).nonzero()
    start = int(used[0]) if len(used) else batches[0].shape[1] - 1
    return tuple(batch[:, start:] for batch in batches)


@torch.no_grad()
def full_ranking_metrics(
    model: RetrievalModel,
    catalogue: Catalogue,
    inputs: list[np.ndarray],
    targets: np.ndarray,
    max_len: int,
    train_action: int,
    chunk: int = 1024,
) -> dict[str, float]:
    """HR/NDCG@10/20 over all items with the history removed (torch twin of the served path)."""
    model.eval()
    vectors = model.catalogue_vectors(catalogue)  # (N+1, d)
    device = vectors.device
    ranks = []
    unlisted = None if catalogue.listed is None else ~catalogue.listed.cpu().numpy()
    for start in range(0, len(inputs), chunk):
        histories = inputs[start : start + chunk]
        items = torch.from_numpy(left_pad(histories, max_len)).to(device)
        actions = torch.where(items > 0, train_action, 0)
        users = model.user_tower(vectors[items], actions)  # (b, d)
        scores = (users @ vectors.T).cpu().numpy()  # (b, N+1)
        exclude_history(scores, histories)
        if unlisted is not None:
            scores[:, unlisted] = -np.inf
        ranks.append(target_ranks(scores, targets[start : start + chunk]))
    return ranking_metrics(np.concatenate(ranks))


def _train_epoch(
    model: RetrievalModel,
    optimizer: torch.optim.Optimizer,
    pairs: tuple[torch.Tensor, torch.Tensor],
    catalogue: Catalogue,
    settings: RetrievalSettings,
    sampler: NegativeSampler | None,
    schedule: Callable[[float], float],
    epoch: int,
    rng: np.random.Generator,
) -> float:
    """One pass over the training pairs; returns the mean loss per predicted position."""
    model.train()
    inputs, targets = pairs
    lengths = (inputs > 0).sum(dim=1).numpy()
    batches = length_bucketed_batches(lengths, settings.batch_size, rng)
    total_loss, total_rows = 0.0, 0
    unlisted = None if catalogue.listed is None else ~catalogue.listed[1:]
    for step, rows in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = group["share"] * settings.learning_rate * schedule(epoch - 1 + step / len(batches))
        index = torch.from_numpy(rows)
        batch_inputs, batch_targets = (batch.to(catalogue.attributes.device)
                                       for batch in _trim_padding(inputs[index], targets[index]))
        vectors = model.catalogue_vectors(catalogue, settings)  # (N+1, d)
        actions = torch.where(batch_inputs > 0, settings.train_action, 0)
        hidden = model.user_tower.encode(vectors[batch_inputs], actions)  # (B, L, d)
        mask = batch_targets > 0
        loss = next_item_loss(hidden[mask], batch_targets[mask], vectors, settings, sampler, unlisted)
        if settings.content_loss_weight > 0:
            loss = loss + settings.content_loss_weight * content_only_loss(
                model, hidden, batch_targets, mask, catalogue, settings, unlisted)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * int(mask.sum())
        total_rows += int(mask.sum())
    return total_loss / max(total_rows, 1)


def train_retrieval(
    config: TowerConfig,
    settings: RetrievalSettings,
    split: LeaveOneOut,
    catalogue: Catalogue,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[RetrievalModel, TrainingReport]:
    """Train both towers on ``device``; returns the model (on the CPU) at its best validation NDCG@10."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = RetrievalModel(config).to(device)
    catalogue = catalogue.to(device)
    optimizer = make_optimizer(model, settings, settings.learning_rate)
    inputs, targets = training_pairs(split.train, config.max_sequence)
    pairs = (torch.from_numpy(inputs), torch.from_numpy(targets))
    sampler = None
    if settings.negatives > 0:
        counts = item_counts(split.train, config.n_items)
        sampler = NegativeSampler(counts, settings.negatives, settings.negative_power, device)
    started = time.monotonic()
    budget = 60.0 * settings.minutes

    def schedule(epochs_done: float) -> float:
        # Progress is epochs or wall-clock time, whichever is further along,
        # so the decay completes inside the time budget.
        done = max(epochs_done / settings.epochs, (time.monotonic() - started) / budget)
        return learning_rate_factor(settings, done)

    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    best_metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    stale, epoch = 0, 0
    bar = tqdm(range(1, settings.epochs + 1), desc="retrieval", disable=not progress, unit="epoch")
    for epoch in bar:
        loss = _train_epoch(model, optimizer, pairs, catalogue, settings, sampler, schedule, epoch, rng)
        record = {"epoch": float(epoch), "loss": loss}
        out_of_time = time.monotonic() - started > budget
        if epoch % settings.eval_every == 0 or out_of_time or epoch == settings.epochs:
            metrics = full_ranking_metrics(
                model, catalogue, split.train, split.valid, config.max_sequence, settings.train_action
            )
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            if metrics["ndcg@10"] > best_score:
                best_score, best_epoch, best_metrics = metrics["ndcg@10"], epoch, metrics
                best_state = copy.deepcopy(model.state_dict())
                stale = 0
            else:
                stale += 1
            bar.set_postfix(loss=f"{loss:.3f}", hr10=f"{metrics['hr@10']:.4f}", ndcg10=f"{metrics['ndcg@10']:.4f}")
        history.append(record)
        if out_of_time or stale >= settings.patience:
            break
    model.load_state_dict(best_state)
    model.cpu().eval()
    report = TrainingReport(
        best_epoch=best_epoch,
        epochs_run=epoch,
        seconds=time.monotonic() - started,
        validation=best_metrics,
        history=history,
    )
    return model, report


def fine_tune_retrieval(
    model: RetrievalModel,
    settings: RetrievalSettings,
    sequences: list[np.ndarray],
    catalogue: Catalogue,
    epochs: int,
    learning_rate: float,
    progress: bool = True,
    device: torch.device | str = "cpu",
    after_epoch: Callable[[int, Catalogue], None] | None = None,
) -> float:
    """Continue training on newer sequences (e.g. items[:-1] once the validation step is past).

    The learning rate decays from ``learning_rate`` to zero over ``epochs`` on a
    cosine; there is no early stopping because the newest step has no held-out
    successor. Trains on ``device`` and leaves the model on the CPU; ``after_epoch(epoch, catalogue
    on that device)`` runs after each epoch. Returns the last epoch's mean loss.
    """
    model.to(device)
    catalogue = catalogue.to(device)
    rng = np.random.default_rng(settings.seed + 1)
    inputs, targets = training_pairs(sequences, model.user_tower.max_sequence)
    pairs = (torch.from_numpy(inputs), torch.from_numpy(targets))
    tuned = replace(settings, learning_rate=learning_rate, warmup_share=0.0)
    optimizer = make_optimizer(model, settings, learning_rate)
    sampler = None
    if settings.negatives > 0:
        counts = item_counts(sequences, model.item_tower.item_embedding.num_embeddings - 1)
        sampler = NegativeSampler(counts, settings.negatives, settings.negative_power, device)
    loss = 0.0
    for epoch in tqdm(range(1, epochs + 1), desc="fine-tune", disable=not progress, unit="epoch"):
        loss = _train_epoch(
            model, optimizer, pairs, catalogue, tuned, sampler,
            lambda done: learning_rate_factor(tuned, done / max(epochs, 1)), epoch, rng,
        )
        if after_epoch is not None:
            after_epoch(epoch, catalogue)
    model.cpu().eval()
    return loss


@dataclass
class FineTuneChoice:
    """What ``fine_tune_newest`` chose: the kept epoch and the held-out users' NDCG@10 per epoch (0 = before)."""

    best_epoch: int
    held_out_users: int
    validation_ndcg: list[float]
    loss: float


def fine_tune_on_newest_step(
    model: RetrievalModel,
    settings: RetrievalSettings,
    split: LeaveOneOut,
    catalogue: Catalogue,
    progress: bool = True,
    device: torch.device | str = "cpu",
    held: np.ndarray | None = None,
) -> dict[str, object]:
    """The towers' last training on items[:-1], as ``settings`` asks: none, a fixed number of
    epochs, or (``fine_tune_holdout`` > 0) as many as ``fine_tune_newest`` chooses. Returns the
    report the manifest keeps."""
    if settings.fine_tune_epochs <= 0:
        return {"epochs": 0}
    if settings.fine_tune_holdout > 0:
        choice = fine_tune_newest(model, settings, split, catalogue, progress, device, held)
        return {"epochs": choice.best_epoch, "held_out_users": choice.held_out_users,
                "held_out_valid_ndcg@10": choice.validation_ndcg}
    fine_tune_retrieval(model, settings, split.inputs("test"), catalogue, settings.fine_tune_epochs,
                        settings.learning_rate * settings.fine_tune_lr_share, progress, device)
    return {"epochs": settings.fine_tune_epochs}


def held_out_users(users: int, share: float, seed: int) -> np.ndarray:
    """(users,) bool: a seeded ``share`` of the users (at least one) whose validation step stays unseen."""
    held = np.zeros(users, dtype=bool)
    held[np.random.default_rng(seed + 2).permutation(users)[: max(1, round(users * share))]] = True
    return held


def newest_step_sequences(split: LeaveOneOut, held: np.ndarray) -> list[np.ndarray]:
    """Per user, items[:-1] (the validation item as the newest target), or items[:-2] when ``held``."""
    return [split.train[row] if held[row] else split.full[row][:-1] for row in range(len(split.users))]


def fine_tune_newest(
    model: RetrievalModel,
    settings: RetrievalSettings,
    split: LeaveOneOut,
    catalogue: Catalogue,
    progress: bool = True,
    device: torch.device | str = "cpu",
    held: np.ndarray | None = None,
) -> FineTuneChoice:
    """Fine-tune on the newest step (items[:-1]) for as long as validation says it helps.

    ``settings.fine_tune_holdout`` of the users (drawn with the seed; or ``held``, a (U,)
    mask over ``split.users``) are fine-tuned on items[:-2] only, so their validation item
    stays unseen; after each of at most
    ``settings.fine_tune_epochs`` epochs their validation NDCG@10 is measured, and the best
    state, the unchanged model included, is kept. The test item is never trained on, and the
    choice reads the validation step alone.
    """
    if held is None:
        held = held_out_users(len(split.users), settings.fine_tune_holdout, settings.seed)
    rows = np.flatnonzero(held)
    sequences = newest_step_sequences(split, held)
    histories, targets = [split.train[row] for row in rows], split.valid[rows]

    def validation_ndcg(on: Catalogue) -> float:
        return full_ranking_metrics(model, on, histories, targets, model.user_tower.max_sequence,
                                    settings.train_action)["ndcg@10"]

    scores = [validation_ndcg(catalogue)]
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())

    def keep_best(epoch: int, on: Catalogue) -> None:
        nonlocal best_epoch, best_state
        scores.append(validation_ndcg(on))
        if scores[-1] > scores[best_epoch]:
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())

    loss = fine_tune_retrieval(model, settings, sequences, catalogue, settings.fine_tune_epochs,
                               settings.learning_rate * settings.fine_tune_lr_share, progress, device, keep_best)
    model.load_state_dict(best_state)
    return FineTuneChoice(best_epoch=best_epoch, held_out_users=len(rows),
                          validation_ndcg=[round(score, 6) for score in scores], loss=loss)
