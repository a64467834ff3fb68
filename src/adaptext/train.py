"""The training loop: length-bucketed dynamic batches, autocast, AdamW, eval per epoch, checkpoints.

Short and explicit on purpose (nanoGPT style): this is where the speed work happens, and where
resume and distributed training hook in. Tokenising, batching and inference live in
adaptext.batching, which inference uses without importing this module.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptext import checkpoint, distributed
from adaptext.batching import BUCKET_POOL, bucketed_batches, collate, seed_everything
from adaptext.cache import FeatureCache
from adaptext.contrastive import FeatureTap, supcon_loss
from adaptext.distributed import sharded_logits
from adaptext.dropout import cpu_dropout
from adaptext.errors import AdaptextError
from adaptext.precision import autocast
from adaptext.precision import resolve as resolve_precision
from adaptext.tasks import Task, lower_is_better, make_loss, output_layer

# ---------------------------------------------------------------- optimisation


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm_or_bias = param.ndim < 2 or "norm" in name.lower()
        (no_decay if is_norm_or_bias else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)


def _write(log: Any, record: dict[str, Any]) -> None:
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()


def _print(bar: Any, line: str) -> None:
    if bar.disable:
        print(line, flush=True)
    else:
        bar.write(line)


def brief(metrics: dict[str, Any]) -> str:
    """The validation line's figures after the loss: the task's usual ones."""
    if "accuracy" in metrics:
        keys = {"acc": "accuracy", "macro_f1": "macro_f1"}
    elif "subset_accuracy" in metrics:
        keys = {"micro_f1": "micro_f1", "macro_f1": "macro_f1", "subset_acc": "subset_accuracy"}
    else:
        keys = {"rmse": "rmse", "mae": "mae", "r2": "r2"}
    return "  ".join(f"val_{short} {metrics[key]:.4f}" for short, key in keys.items())


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if lower_is_better(metric) else new > old


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


def sorting_pool(rows: int, batch_size: int, contrastive: bool) -> int:
    """How many batches bucketing sorts by length together. When one pool holds the whole epoch the same
    rows meet in the same batches every epoch (with two or more, the shuffle changes each pool's rows),
    and the contrastive signal is which rows meet: then a pool is a quarter of the epoch (an 8/class set:
    random batches). Otherwise, and without the contrastive term, unchanged."""
    batches = math.ceil(rows / batch_size)
    if not contrastive or batches > BUCKET_POOL:
        return BUCKET_POOL
    return max(1, batches // 4)


def planned_epochs(n_train: int, cfg: Any) -> float:
    """--epochs, raised on small data so that training takes at least --min-steps optimiser steps."""
    if cfg.epochs == 0 or not getattr(cfg, "min_steps", 0):
        return cfg.epochs
    batches_per_epoch = max(math.ceil(n_train / cfg.batch_size), 1)
    return max(cfg.epochs, cfg.min_steps * cfg.grad_accum / batches_per_epoch)


def planned_steps(n_train: int, cfg: Any) -> tuple[int, int, int]:
    """Batches per epoch, batches in all, optimiser steps in all."""
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_batches = math.ceil(batches_per_epoch * planned_epochs(n_train, cfg))
    return batches_per_epoch, total_batches, math.ceil(total_batches / cfg.grad_accum)


def train_loop(
    model: nn.Module,
    train_ids: list[list[int]],
    train_labels: list[int],
    val_ids: list[list[int]],
    val_labels: list[int],
    class_names: list[str],
    pad_id: int,
    cfg: Any,
    log_path: Path | None = None,
    progress: bool = True,
    features: FeatureCache | None = None,
    val_pool: Callable[[np.ndarray], np.ndarray] | None = None,
    checkpointer: checkpoint.Checkpointer | None = None,
    resume: dict[str, Any] | None = None,
    group: distributed.Group | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    task: Task | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    contrastive: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the best evaluated weights.

    With ``features`` (see adaptext.cache), the frozen lower layers run once over train and
    validation at the start (the train pass counted in the training time, the validation pass, like
    the evaluations, in the wall time only) and every step runs only the layers above.
    With ``checkpointer``, the run's state is saved at epoch ends and every few steps; ``resume`` (a
    loaded checkpoint) continues such a run exactly where it stopped. With ``group`` (see
    adaptext.distributed), each process trains on its rows of every global batch.
    With ``val_pool`` (sliding windows, see adaptext.windows), ``val_ids`` are windows and ``val_labels``
    belong to texts: validation logits are pooled per text before they are scored.
    ``on_eval`` is called with every validation record (epoch, step, metrics); an exception it raises
    (say, a hyper-parameter search pruning the trial) ends training and propagates; ``on_log`` likewise
    with every training-log record (step, epoch, loss, lr, samples/s, tokens/s). ``task`` (see
    adaptext.tasks) sets the loss, the label tensors and the validation metrics (default: single-label);
    ``cfg.metric`` must be one of its metrics. ``contrastive`` weighs a supervised contrastive term on the
    pooled vectors (single-label; adaptext.contrastive), computed on each process's rows.
    """
    task = task or Task()
    metric = task.resolve_metric(cfg.metric)
    group = group or distributed.Group()
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    lengths = [len(x) for x in train_ids]
    batches_per_epoch, total_batches, total_steps = planned_steps(len(train_ids), cfg)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    eval_points = {
        min(e * batches_per_epoch + round(k * batches_per_epoch / cfg.evals_per_epoch), total_batches)
        for e in range(math.ceil(planned_epochs(len(train_ids), cfg)))
        for k in range(1, cfg.evals_per_epoch + 1)
    }
    eval_points.add(total_batches)
    if not val_ids:  # no validation split (small data, see data.load_training_data): a fixed schedule
        eval_points = set()

    # Compiled graphs are shape-specialised: wider padding buckets mean a few compiles, not one per width.
    # (Not with the feature cache: its per-batch stand-in tensor would recompile every step.)
    step_model = torch.compile(model) if cfg.compile and features is None else model
    pad_multiple = 32 if cfg.compile else 8
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.resolved_lr())
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_params(group, trainable)
    loss_fn = make_loss(cfg, train_labels, len(class_names), device, task)
    labels_all = task.label_tensor(train_labels, len(class_names))
    rank_allocator = getattr(getattr(model, "base_model", None), "update_and_allocate", None)

    result = TrainResult()
    state = (
        LoopState.restore(resume, model, optimizer, group, rng, result, log_path) if resume is not None else LoopState()
    )
    log = log_path.open("a", encoding="utf-8") if log_path else None
    from tqdm.auto import tqdm

    # disable=None: a bar on terminals only, not a flood of carriage returns in CI logs and pipes.
    bar = tqdm(
        total=total_batches, initial=state.batch_no, desc="train", unit="batch", disable=True if not progress else None,
        leave=False,
    )  # fmt: skip
    model.train()
    started = wall_started = time.perf_counter()
    if features is not None:
        features.build(model, "train", train_ids, pad_id, max(cfg.batch_size, 64), precision)
        val_started = time.perf_counter()
        if val_ids:
            features.build(model, "validation", val_ids, pad_id, max(cfg.batch_size, 64), precision)
        started += time.perf_counter() - val_started  # validation work, counted like the evaluation passes
    feed_val = (lambda b, w: features.feed("validation", b, w, device)) if features is not None else None
    attached = features.attached() if features is not None else contextlib.nullcontext()
    if resume is not None:
        checkpoint.set_rng_state(resume["rng"])  # dropout continues as it would have

    def train_time() -> float:
        return state.trained_before + time.perf_counter() - started

    # Cheap dropout masks on a CPU (adaptext.dropout); compiled graphs make their own.
    cheap_masks = cpu_dropout(model, enabled=device.type == "cpu" and step_model is model)
    # Single-label: a supervised contrastive term on the pooled vectors (adaptext.contrastive).
    contrast = task.kind == "single-label" and contrastive > 0
    pool = sorting_pool(len(train_ids), cfg.batch_size, contrast)
    tap = FeatureTap()
    tapped = tap.attached(output_layer(model, len(class_names))) if contrast else contextlib.nullcontext()
    try:
        with attached, cheap_masks, tapped:
            while state.batch_no < total_batches:
                epoch_rng = checkpoint.python_rng_to_tensor(rng)  # before this epoch's shuffle: resume replays it
                for k, batch in enumerate(bucketed_batches(lengths, cfg.batch_size, rng, pool)):
                    if k < state.skip:  # done before the checkpoint this run resumed from
                        continue
                    if state.batch_no >= total_batches:
                        break
                    rows = group.share(batch)
                    # A process can get no rows of a short last batch. It still joins the gradient sum; under
                    # FSDP it must also run the forward and backward (they are collective): one row, weight 0.
                    weight = len(rows) / len(batch)
                    if not rows and group.sharded:
                        rows, weight = batch[:1], 0.0
                    if rows:
                        padded = collate([train_ids[i] for i in rows], pad_id, pad_multiple)
                        inputs = {k: v.to(device) for k, v in padded.items()}
                        if features is not None:
                            features.feed("train", rows, padded["input_ids"].shape[1], device)
                        with autocast(precision, device):
                            logits = step_model(**inputs).logits
                        if cfg.loss == "contrastive":  # the head trains nothing (it is refitted after); the zero
                            # keeps it in the graph, so every process reduces the same parameters
                            loss = 0.0 * logits.float().sum()
                        else:
                            loss = loss_fn(logits.float(), labels_all[rows].to(device))
                        if contrast:
                            pooled = tap.pooled(inputs["attention_mask"].sum(1))
                            loss = loss + contrastive * supcon_loss(
                                pooled, labels_all[rows].to(device), cfg.contrastive_temperature
                            )
                        # Scaled by this process's share of the batch: summed over processes, the gradient
                        # is the whole batch's mean, as in a single process. (FSDP averages over processes
                        # rather than summing: times world.)
                        scale = weight * (group.world if group.sharded else 1) / cfg.grad_accum
                        (loss * scale).backward()
                        if weight:
                            state.positions += padded["input_ids"].numel()
                            state.real += sum(lengths[i] for i in rows)
                            state.window_loss += loss.item()
                            state.window_n += 1
                    state.batch_no += 1
                    state.seen += len(batch)
                    state.tokens += sum(lengths[i] for i in batch)
                    stepped = state.batch_no % cfg.grad_accum == 0 or state.batch_no == total_batches
                    if stepped:
                        distributed.sum_gradients(group, trainable)
                        if cfg.max_grad_norm:
                            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                        factor = lr_factor(state.step, total_steps, warmup, cfg.scheduler)
                        for param_group in optimizer.param_groups:
                            param_group["lr"] = cfg.resolved_lr() * factor
                        optimizer.step()
                        if rank_allocator is not None:  # AdaLoRA prunes ranks from the gradients' sensitivity
                            rank_allocator(state.step)
                        optimizer.zero_grad(set_to_none=True)
                        state.step += 1
                        elapsed = train_time()
                        if state.step % cfg.log_every == 0:
                            step_record = {
                                "step": state.step, "epoch": round(state.batch_no / batches_per_epoch, 4),
                                "loss": round(state.window_loss / max(state.window_n, 1), 5), "lr": cfg.resolved_lr() * factor,
                                "samples_per_s": round(state.seen / elapsed, 2), "tokens_per_s": round(state.tokens / elapsed, 1),
                            }  # fmt: skip
                            _write(log, step_record)
                            if on_log is not None:
                                on_log(step_record)
                        bar.set_postfix(
                            loss=f"{state.window_loss / max(state.window_n, 1):.4f}", sps=f"{state.seen / elapsed:.1f}"
                        )
                        if state.step % cfg.log_every == 0:
                            state.window_loss, state.window_n = 0.0, 0
                    bar.update(1)
                    if state.batch_no in eval_points:
                        eval_started = time.perf_counter()
                        val_logits = sharded_logits(
                            model, val_ids, pad_id, max(cfg.batch_size, 32), precision, device, group, feed_val
                        )
                        if val_pool is not None:
                            val_logits = val_pool(val_logits)
                        # Multi-label: thresholds tuned on these rows, as they will be for the saved model, so
                        # epochs compare by how well they separate the classes rather than by a fixed 0.5 cut.
                        scored = task.with_tuned_thresholds(
                            val_labels, val_logits, len(class_names), getattr(cfg, "threshold", None)
                        )
                        metrics = scored.metrics(
                            val_labels, task.in_training_units(val_logits), class_names, brief=True
                        )
                        record = {"epoch": round(state.batch_no / batches_per_epoch, 4), "step": state.step, **metrics}
                        result.history.append(record)
                        _write(log, {"eval": record})
                        if group.primary:
                            _print(
                                bar, f"epoch {record['epoch']:.2f}  val_loss {metrics['loss']:.4f}  " + brief(metrics)
                            )
                        started += time.perf_counter() - eval_started  # throughput counts training only
                        if on_eval is not None:
                            on_eval(record)
                        if _better(metric, metrics[metric], result.best and result.best[metric]):
                            result.best, result.best_val_logits = record, val_logits
                            state.best_state = {
                                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                            }
                            state.bad_evals = 0
                        else:
                            state.bad_evals += 1
                            if cfg.early_stopping and state.bad_evals >= cfg.early_stopping:
                                result.stopped_early = True
                                break
                    due = (
                        checkpointer is not None
                        and stepped
                        and state.batch_no < total_batches
                        and checkpointer.due(state.step, state.batch_no % batches_per_epoch == 0)
                    )
                    if group.sharded and stepped and state.batch_no < total_batches:
                        due = distributed.agree(group, due)  # gathering the state is collective under FSDP
                    if due:
                        if log is not None:
                            log.flush()
                        saved = state.to_checkpoint(
                            batch_in_epoch=k + 1, epoch_rng=epoch_rng, train_seconds=train_time(), result=result,
                            model=model, optimizer=optimizer, group=group, log_path=log_path,
                        )  # fmt: skip
                        if checkpointer is not None:  # rank 0
                            checkpointer.save(saved)
                state.skip = 0
                if result.stopped_early:
                    break
    finally:
        bar.close()
        if log:
            log.close()
        if features is not None:
            features.close()
    result.train_seconds = train_time()
    result.wall_seconds = state.trained_before + time.perf_counter() - wall_started
    result.samples_per_second = state.seen / result.train_seconds if state.seen else 0.0
    result.tokens_per_second = state.tokens / result.train_seconds if state.seen else 0.0
    result.padding_fraction = 1 - state.real / state.positions if state.positions else 0.0
    result.steps = state.step
    if state.best_state is not None:
        distributed.load_params(model, state.best_state)
    model.eval()
    return result
