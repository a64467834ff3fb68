"""What a training run plans and counts: its schedule, its state (what a checkpoint saves and restores)
and its result. The loop that moves them is adaptext.train."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptext import checkpoint, distributed
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError


def planned_epochs(n_train: int, cfg: TrainConfig) -> float:
    """--epochs, raised to --small-data-epochs when the loss is the contrastive loss alone (small data, no
    validation split), then on small data so that training takes at least --min-steps optimiser steps; with
    --max-steps, exactly that many steps' worth of epochs. ``cfg.loss`` is the resolved loss."""
    batches_per_epoch = max(math.ceil(n_train / cfg.batch_size), 1)
    if cfg.max_steps:
        return cfg.max_steps * cfg.grad_accum / batches_per_epoch
    if cfg.epochs == 0:
        return 0
    epochs = cfg.epochs
    if cfg.loss == "contrastive" and cfg.small_data_epochs:
        epochs = max(epochs, cfg.small_data_epochs)
    if cfg.min_steps:
        epochs = max(epochs, cfg.min_steps * cfg.grad_accum / batches_per_epoch)
    return epochs


def planned_steps(n_train: int, cfg: TrainConfig) -> tuple[int, int, int]:
    """Batches per epoch, batches in all, optimiser steps in all."""
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_batches = math.ceil(batches_per_epoch * planned_epochs(n_train, cfg))
    return batches_per_epoch, total_batches, math.ceil(total_batches / cfg.grad_accum)


@dataclass
class Schedule:
    """How many batches and optimiser steps a run takes, its warm-up, and after which batches it evaluates."""

    batches_per_epoch: int
    total_batches: int
    total_steps: int
    warmup: int
    eval_points: set[int]

    @classmethod
    def plan(cls, n_train: int, cfg: TrainConfig, validated: bool) -> Schedule:
        batches_per_epoch, total_batches, total_steps = planned_steps(n_train, cfg)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
        eval_points = {
            min(
                e * batches_per_epoch + round(k * batches_per_epoch / cfg.evals_per_epoch),
                total_batches,
            )
            for e in range(math.ceil(planned_epochs(n_train, cfg)))
            for k in range(1, cfg.evals_per_epoch + 1)
        }
        eval_points.add(total_batches)
        if not validated:  # no validation split (small data, see data.load_training_data): a fixed schedule
            eval_points = set()
        return cls(batches_per_epoch, total_batches, total_steps, warmup, eval_points)


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    train_seconds: float = 0.0  # optimisation only
    wall_seconds: float = 0.0  # including the validation passes
    samples_per_second: float = 0.0
    tokens_per_second: float = 0.0
    padding_fraction: float = 0.0  # share of the training batches' positions that were padding
    steps: int = 0
    stopped_early: bool = False
    resumed_from_step: int | None = None
    best_val_logits: np.ndarray | None = None  # the best evaluation's (pooled) logits, so nobody recomputes them


@dataclass
class LoopState:
    """What the loop counts as it goes; a checkpoint is this plus the tensors and RNG states, written by
    ``to_checkpoint`` and read back by ``restore`` (side by side, so what is saved is what is restored)."""

    step: int = 0  # optimiser steps taken
    batch_no: int = 0  # batches consumed, over all epochs
    skip: int = 0  # batches of the current epoch done before the checkpoint a resumed run started from
    seen: int = 0  # examples consumed
    tokens: int = 0  # real tokens consumed (all processes' rows)
    positions: int = 0  # this process's padded positions and real tokens: the padding share
    real: int = 0
    window_loss: float = 0.0  # the loss summed since the last log line, and over how many batches
    window_n: int = 0
    trained_before: float = 0.0  # training seconds of the interrupted run, when resuming
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    best_state: dict[str, torch.Tensor] | None = None  # the trainable tensors at the best evaluation

    def to_checkpoint(
        self, *, batch_in_epoch: int, epoch_rng: torch.Tensor, train_seconds: float, result: TrainResult,
        model: nn.Module, optimizer: torch.optim.Optimizer, group: distributed.Group, log_path: Path | None,
    ) -> dict[str, Any]:  # fmt: skip
        """The checkpoint's contents (under FSDP every process calls this: gathering is collective)."""
        return {
            "step": self.step, "batch_no": self.batch_no, "batch_in_epoch": batch_in_epoch, "epoch_rng": epoch_rng,
            "rng": checkpoint.rng_state(), "sharded": group.sharded,
            "optimizer": distributed.optimizer_state(model, optimizer, group),
            "trainable": distributed.full_tensors({n: p for n, p in model.named_parameters() if p.requires_grad}),
            "counters": {"seen": self.seen, "tokens": self.tokens, "positions": self.positions, "real": self.real,
                         "window_loss": self.window_loss, "window_n": self.window_n, "train_seconds": train_seconds},
            "history": result.history, "best": result.best,
            "best_state": distributed.full_tensors(self.best_state) if self.best_state is not None else None,
            "bad_evals": self.bad_evals,
            "log": log_path.read_text(encoding="utf-8") if log_path is not None else "",
        }  # fmt: skip

    @classmethod
    def restore(
        cls, saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, group: distributed.Group,
        rng: random.Random, result: TrainResult, log_path: Path | None,
    ) -> LoopState:  # fmt: skip
        """Put ``model``, ``optimizer``, the shuffle ``rng``, ``result`` and the log back where
        ``to_checkpoint`` found them; return the counters."""
        if saved.get("sharded", False) != group.sharded:
            raise AdaptextError(
                f"the checkpoint was written by a run {'with' if saved.get('sharded') else 'without'} FSDP sharding; "
                "resume it the same way (same --shard and number of processes), or start over with --overwrite"
            )
        distributed.load_params(model, saved["trainable"])
        distributed.load_optimizer_state(model, optimizer, saved["optimizer"], group)
        rng.setstate(checkpoint.python_rng_from_tensor(saved["epoch_rng"]))  # replay this epoch's shuffle
        result.history, result.best = saved["history"], saved["best"]
        result.resumed_from_step = saved["step"]
        if log_path is not None:
            log_path.write_text(saved["log"], encoding="utf-8")
        counters = saved["counters"]
        return cls(
            step=saved["step"], batch_no=saved["batch_no"], skip=saved["batch_in_epoch"], seen=counters["seen"],
            tokens=counters["tokens"], positions=counters["positions"], real=counters.get("real", counters["tokens"]),
            window_loss=counters["window_loss"], window_n=counters["window_n"],
            trained_before=counters["train_seconds"], bad_evals=saved["bad_evals"], best_state=saved["best_state"],
        )  # fmt: skip
