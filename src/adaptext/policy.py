"""What a training run decides from its data and options, each decision said in one line: how the head
starts (a probe or random), the loss (cross-entropy, or the contrastive loss alone on small data), the
contrastive term's weight, the schedule, the output layer's refit, the regression target scale, and the
warnings on imbalanced data and on a model that learned nothing. The few-label recipe is these
choices (docs/RESULTS.md "Few labels"); adaptext.api applies them in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from adaptext import config, data, distributed, probe, tasks
from adaptext.errors import AdaptextError, names
from adaptext.tasks import Task
from adaptext.train_state import planned_steps
from adaptext.windows import Windowing


def head_init(cfg: config.TrainConfig, task: Task, pooling: str = "mean") -> str:
    """``auto``: a probe for single-label training of a mean-pooled (sentence-transformers) encoder, where
    it was measured (docs/RESULTS.md "Few labels"); multi-label and regression heads have their own
    starts (class rates, the target mean); a random head when nothing trains (--epochs 0)."""
    if cfg.head_init != "auto":
        if cfg.head_init == "probe" and task.kind != "single-label":
            raise AdaptextError(f"--head-init probe is for single-label data; this is {task.kind}: use auto or random")
        return cfg.head_init
    return "probe" if task.kind == "single-label" and cfg.epochs > 0 and pooling == "mean" else "random"


def refit_head(
    model: torch.nn.Module,
    cfg: config.TrainConfig,
    task: Task,
    head_start: str,
    loss: str,
    group: distributed.Group,
    encoded: dict[str, Any],
    dataset: data.TextDataset,
    train_labels: list[Any],
    precision: str,
    pad_id: int,
    windowing: Windowing,
    echo: Callable[[str], None],
) -> probe.Refit | None:
    """The output layer refitted on the trained features (probe.refit_head) where --head-refit asks for it."""
    wanted = loss == "contrastive" or {"on": True, "off": False}.get(cfg.head_refit, head_start == "probe")
    if not wanted or task.kind != "single-label" or cfg.epochs == 0:
        return None
    if group.sharded:
        echo("head: --head-refit skipped: with FSDP the output layer is sharded across processes")
        return None
    validation = encoded.get("validation")
    found = probe.refit_head(
        model,
        encoded["train"].ids,
        train_labels,
        dataset.num_labels,
        pad_id,
        precision,
        cfg.seed,
        (validation.ids, dataset.splits["validation"].labels) if validation is not None else None,
        (lambda logits: windowing.pool_logits(logits, validation)) if windowing.sliding else None,
    )
    echo(f"head: {found.describe()}")
    return found


def contrastive_weight(cfg: config.TrainConfig, pooling: str, loss: str = "cross-entropy") -> float:
    """--contrastive, or its default: 1 with mean pooling (measured there) or as the whole loss, else 0."""
    if cfg.contrastive is not None:
        return cfg.contrastive
    return 1.0 if pooling == "mean" or loss == "contrastive" else 0.0


def resolve_loss(cfg: config.TrainConfig, task: Task, head_start: str, validated: bool) -> str:
    """--loss, with auto decided: the contrastive loss alone (then a refitted head) for small single-label
    data whose head starts as a probe, where it was measured (docs/RESULTS.md "Few labels"); else cross-entropy."""
    if cfg.loss == "contrastive" and task.kind != "single-label":
        raise AdaptextError(f"--loss contrastive is for single-label data; this is {task.kind}: use auto")
    if cfg.loss != "auto":
        return cfg.loss
    small = task.kind == "single-label" and head_start == "probe" and not validated and cfg.epochs > 0
    return "contrastive" if small and cfg.head_refit != "off" and cfg.contrastive != 0 else "cross-entropy"


def schedule_line(cfg: config.TrainConfig, rows: int, epochs: float, validated: bool, task: Task) -> str:
    """What the schedule is and why, in one line."""
    steps = planned_steps(rows, cfg)[2]
    longer = cfg.loss == "contrastive" and cfg.small_data_epochs > cfg.epochs
    if cfg.max_steps:
        why = f"--max-steps {cfg.max_steps} ({epochs:.3g} epochs)"
    elif epochs == cfg.epochs:
        why = f"--epochs {cfg.epochs:g}"
    elif longer and epochs == cfg.small_data_epochs:
        why = f"--epochs {cfg.epochs:g} raised to --small-data-epochs {epochs:g} (the contrastive loss alone)"
    else:
        why = f"--epochs {cfg.epochs:g} raised to {epochs:.3g} to reach --min-steps {cfg.min_steps}"
    if validated:
        keep = f"the evaluation with the best validation {task.resolve_metric(cfg.metric)} is kept"
    else:
        keep = "no validation split, so the final weights are kept"
    return f"{steps} optimiser steps ({why}); {keep}"


def warn_if_imbalanced(labels: list[int], class_names: list[str], cfg: config.TrainConfig, echo: Callable) -> None:
    """Skewed training classes (largest/smallest >= data.SKEW_RATIO): the counts, and the remedies not in use."""
    ratio, counts = data.skew(labels, class_names)
    if ratio < data.SKEW_RATIO:
        return
    shown = [f"{names([name])} {n:,}" for name, n in counts.items()]
    if len(shown) > 12:
        shown = shown[:6] + [f"... {len(shown) - 10} more ..."] + shown[-4:]
    what = f"training classes are imbalanced (largest/smallest {ratio:.1f}x): {', '.join(shown)}"
    in_use = {"--class-weights": cfg.class_weights, "--loss focal": cfg.loss == "focal"}
    losses = [flag for flag, used in in_use.items() if not used]
    tips = [" and/or ".join(losses)] if losses else []
    if cfg.metric != "macro_f1":
        tips.append("--metric macro_f1 (keeps the epoch that is best over all classes, not the largest)")
    if not tips:
        echo(f"data: {what}; using --class-weights, --loss focal and --metric macro_f1")
        return
    echo(f"warning: {what}; accuracy can look good while small classes are missed: try {', and '.join(tips)}")


def warn_if_nothing_learned(
    val: dict[str, Any],
    labels: list[Any],
    cfg: config.TrainConfig,
    echo: Callable,
    task: Task | None = None,
    split: str = "validation",
) -> None:
    """A model no better than a constant answer has diverged or learned nothing: say so, say what to try."""
    tip = f"training diverged or learned nothing; try a lower --lr (now {cfg.resolved_lr():g}) or more --epochs"
    task = task or Task()
    if task.kind == "regression":
        if val["r2"] <= 0.0:
            echo(f"warning: {split} R² {val['r2']:.3f} is no better than always predicting the mean: {tip}")
        return
    if task.kind == "multi-label":
        if val["micro_f1"] == 0.0:
            echo(f"warning: {split} micro-F1 is 0 (no label predicted right): {tip}")
        return
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    if val["accuracy"] <= majority + 0.01:
        echo(
            f"warning: {split} accuracy {val['accuracy']:.3f} is no better than always answering the most "
            f"common class ({majority:.3f}): {tip}"
        )


def target_scale(model: torch.nn.Module, targets: list[float], echo: Callable) -> Task:
    """Regression trains on standardised targets (well-conditioned whatever their scale); the head is
    rescaled after training (tasks.fold_target_scale). A head without a bias cannot carry the mean: its
    targets are only scaled, by their root mean square."""
    values = np.asarray(targets, dtype=np.float64)
    if tasks.output_layer(model).bias is None:
        mean, std = 0.0, float(np.sqrt((values**2).mean()))
    else:
        mean, std = float(values.mean()), float(values.std())
    echo(f"regression: targets mean {values.mean():.4g}, std {values.std():.4g} (trained standardised)")
    return Task("regression", mean=mean, std=std or 1.0)
