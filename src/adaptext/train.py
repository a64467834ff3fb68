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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptext import checkpoint, distributed
from adaptext.batching import BUCKET_POOL, bucketed_batches, collate, seed_everything
from adaptext.cache import FeatureCache
from adaptext.config import TrainConfig
from adaptext.contrastive import FeatureTap, supcon_loss
from adaptext.distributed import sharded_logits
from adaptext.dropout import cpu_dropout
from adaptext.precision import autocast
from adaptext.precision import resolve as resolve_precision
from adaptext.tasks import Task, lower_is_better, make_loss, output_layer
from adaptext.train_state import LoopState, Schedule, TrainResult

# ---------------------------------------------------------------- optimisation


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm_or_bias = param.ndim < 2 or "norm" in name.lower()
        (no_decay if is_norm_or_bias else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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
        keys = {
            "micro_f1": "micro_f1",
            "macro_f1": "macro_f1",
            "subset_acc": "subset_accuracy",
        }
    else:
        keys = {"rmse": "rmse", "mae": "mae", "r2": "r2"}
    return "  ".join(f"val_{short} {metrics[key]:.4f}" for short, key in keys.items())


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if lower_is_better(metric) else new > old


def sorting_pool(rows: int, batch_size: int, contrastive: bool) -> int:
    """How many batches bucketing sorts by length together. When one pool holds the whole epoch the same
    rows meet in the same batches every epoch (with two or more, the shuffle changes each pool's rows),
    and the contrastive signal is which rows meet: then a pool is a quarter of the epoch (an 8/class set:
    random batches). Otherwise, and without the contrastive term, unchanged."""
    batches = math.ceil(rows / batch_size)
    if not contrastive or batches > BUCKET_POOL:
        return BUCKET_POOL
    return max(1, batches // 4)


def train_loop(
    model: nn.Module,
    train_ids: list[list[int]],
    train_labels: list[int],
    val_ids: list[list[int]],
    val_labels: list[int],
    class_names: list[str],
    pad_id: int,
    cfg: TrainConfig,
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
    run = _setup(
        model, train_ids, train_labels, val_ids, val_labels, class_names, pad_id, cfg, log_path, progress, features,
        val_pool, checkpointer, resume, group, on_eval, task, on_log, contrastive,
    )  # fmt: skip
    state, result = run.state, run.result
    # Cheap dropout masks on a CPU (adaptext.dropout); compiled graphs make their own.
    cheap_masks = cpu_dropout(model, enabled=run.device.type == "cpu" and run.step_model is model)
    tapped = run.tap.attached(output_layer(model, len(class_names))) if run.tap else contextlib.nullcontext()
    attached = features.attached() if features is not None else contextlib.nullcontext()
    pool = sorting_pool(len(train_ids), cfg.batch_size, run.tap is not None)
    try:
        with attached, cheap_masks, tapped:
            while state.batch_no < run.plan.total_batches:
                epoch_rng = checkpoint.python_rng_to_tensor(run.rng)  # before this epoch's shuffle: resume replays it
                for k, batch in enumerate(bucketed_batches(run.lengths, cfg.batch_size, run.rng, pool)):
                    if k < state.skip:  # done before the checkpoint this run resumed from
                        continue
                    if state.batch_no >= run.plan.total_batches:
                        break
                    _forward_backward(run, batch)
                    stepped = state.batch_no % cfg.grad_accum == 0 or state.batch_no == run.plan.total_batches
                    if stepped:
                        _optimizer_step(run)
                    run.bar.update(1)
                    if state.batch_no in run.plan.eval_points and _evaluate(run):
                        break  # early stopping
                    _checkpoint_if_due(run, stepped, k + 1, epoch_rng)
                state.skip = 0
                if result.stopped_early:
                    break
    finally:
        run.bar.close()
        if run.log:
            run.log.close()
        if features is not None:
            features.close()
    return _finish(run)


@dataclass
class _Run:
    """What the steps of one training run share: built once by ``_setup``, read by the step functions."""

    cfg: TrainConfig
    model: nn.Module
    step_model: nn.Module  # the model, or its torch.compile'd wrapper
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    labels_all: torch.Tensor
    task: Task
    metric: str  # what picks the best evaluation
    group: distributed.Group
    device: torch.device
    precision: str
    plan: Schedule
    rng: random.Random  # the batches' shuffle
    lengths: list[int]
    train_ids: list[list[int]]
    val_ids: list[list[int]]
    val_labels: list[int]
    class_names: list[str]
    pad_id: int
    pad_multiple: int
    features: FeatureCache | None
    val_pool: Callable[[np.ndarray], np.ndarray] | None
    contrastive: float  # the contrastive term's weight (0: off)
    tap: FeatureTap | None  # reads the pooled vectors when the contrastive term is on
    rank_allocator: Callable[[int], None] | None  # AdaLoRA's
    checkpointer: checkpoint.Checkpointer | None
    log_path: Path | None
    log: Any  # the JSONL log file, open for appending
    bar: Any  # tqdm
    on_eval: Callable[[dict[str, Any]], None] | None
    on_log: Callable[[dict[str, Any]], None] | None
    state: LoopState
    result: TrainResult
    started: float = 0.0  # perf_counter at the start, moved on by the time spent outside training steps
    wall_started: float = 0.0

    def train_time(self) -> float:
        return self.state.trained_before + time.perf_counter() - self.started


def row_lengths(ids: Sequence[list[int]]) -> list[int]:
    """Tokens per row: from the offsets of flat rows (adaptext.token_store), else by measuring each list."""
    lengths = getattr(ids, "lengths", None)
    return lengths.tolist() if lengths is not None else [len(x) for x in ids]


def _setup(
    model: nn.Module, train_ids: list[list[int]], train_labels: list[int], val_ids: list[list[int]],
    val_labels: list[int], class_names: list[str], pad_id: int, cfg: TrainConfig, log_path: Path | None,
    progress: bool, features: FeatureCache | None, val_pool: Callable[[np.ndarray], np.ndarray] | None,
    checkpointer: checkpoint.Checkpointer | None, resume: dict[str, Any] | None, group: distributed.Group | None,
    on_eval: Callable[[dict[str, Any]], None] | None, task: Task | None,
    on_log: Callable[[dict[str, Any]], None] | None, contrastive: float,
) -> _Run:  # fmt: skip
    """The optimiser, the loss, the schedule, the restored state of a resumed run, the log and the bar."""
    task = task or Task()
    metric = task.resolve_metric(cfg.metric)
    group = group or distributed.Group()
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    plan = Schedule.plan(len(train_ids), cfg, bool(val_ids))
    # Compiled graphs are shape-specialised: wider padding buckets mean a few compiles, not one per width.
    # (Not with the feature cache: its per-batch stand-in tensor would recompile every step.)
    step_model = torch.compile(model) if cfg.compile and features is None else model
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.resolved_lr())
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_params(group, trainable)
    result = TrainResult()
    state = LoopState()
    if resume is not None:
        state = LoopState.restore(resume, model, optimizer, group, rng, result, log_path)
    from tqdm.auto import tqdm

    # disable=None: a bar on terminals only, not a flood of carriage returns in CI logs and pipes.
    bar = tqdm(
        total=plan.total_batches, initial=state.batch_no, desc="train", unit="batch",
        disable=True if not progress else None, leave=False,
    )  # fmt: skip
    # Single-label: a supervised contrastive term on the pooled vectors (adaptext.contrastive).
    contrast = contrastive if task.kind == "single-label" and contrastive > 0 else 0.0
    run = _Run(
        cfg=cfg, model=model, step_model=step_model, optimizer=optimizer, trainable=trainable,
        loss_fn=make_loss(cfg, train_labels, len(class_names), device, task),
        labels_all=task.label_tensor(train_labels, len(class_names)), task=task, metric=metric, group=group,
        device=device, precision=precision, plan=plan, rng=rng, lengths=row_lengths(train_ids),
        train_ids=train_ids, val_ids=val_ids, val_labels=val_labels, class_names=class_names, pad_id=pad_id,
        pad_multiple=32 if cfg.compile else 8, features=features, val_pool=val_pool, contrastive=contrast,
        tap=FeatureTap() if contrast else None,
        rank_allocator=getattr(getattr(model, "base_model", None), "update_and_allocate", None),
        checkpointer=checkpointer, log_path=log_path,
        log=log_path.open("a", encoding="utf-8") if log_path else None, bar=bar, on_eval=on_eval, on_log=on_log,
        state=state, result=result,
    )  # fmt: skip
    model.train()
    run.started = run.wall_started = time.perf_counter()
    if features is not None:
        features.build(model, "train", train_ids, pad_id, max(cfg.batch_size, 64), precision)
        val_started = time.perf_counter()
        if val_ids:
            features.build(model, "validation", val_ids, pad_id, max(cfg.batch_size, 64), precision)
        run.started += time.perf_counter() - val_started  # validation work, counted like the evaluation passes
    if resume is not None:
        checkpoint.set_rng_state(resume["rng"])  # dropout continues as it would have
    return run


def _forward_backward(run: _Run, batch: list[int]) -> None:
    """This process's rows of one batch: forward, loss, backward (gradients accumulate), counters."""
    cfg, state, group = run.cfg, run.state, run.group
    rows = group.share(batch)
    # A process can get no rows of a short last batch. It still joins the gradient sum; under FSDP it
    # must also run the forward and backward (they are collective): one row, weight 0.
    weight = len(rows) / len(batch)
    if not rows and group.sharded:
        rows, weight = batch[:1], 0.0
    if rows:
        padded = collate([run.train_ids[i] for i in rows], run.pad_id, run.pad_multiple)
        inputs = {k: v.to(run.device) for k, v in padded.items()}
        if run.features is not None:
            run.features.feed("train", rows, padded["input_ids"].shape[1], run.device)
        with autocast(run.precision, run.device):
            logits = run.step_model(**inputs).logits
        labels = run.labels_all[rows].to(run.device)
        if cfg.loss == "contrastive":  # the head trains nothing (it is refitted after); the zero keeps it
            loss = 0.0 * logits.float().sum()  # in the graph, so every process reduces the same parameters
        else:
            loss = run.loss_fn(logits.float(), labels)
        if run.tap is not None:
            pooled = run.tap.pooled(inputs["attention_mask"].sum(1))
            loss = loss + run.contrastive * supcon_loss(pooled, labels, cfg.contrastive_temperature)
        # Scaled by this process's share of the batch: summed over processes, the gradient is the whole
        # batch's mean, as in a single process. (FSDP averages over processes rather than summing: times world.)
        scale = weight * (group.world if group.sharded else 1) / cfg.grad_accum
        (loss * scale).backward()
        if weight:
            state.positions += padded["input_ids"].numel()
            state.real += sum(run.lengths[i] for i in rows)
            state.window_loss += loss.item()
            state.window_n += 1
    state.batch_no += 1
    state.seen += len(batch)
    state.tokens += sum(run.lengths[i] for i in batch)


def _optimizer_step(run: _Run) -> None:
    """Sum the processes' gradients, clip, set the learning rate, step; the log line every --log-every."""
    cfg, state = run.cfg, run.state
    distributed.sum_gradients(run.group, run.trainable)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
    factor = lr_factor(state.step, run.plan.total_steps, run.plan.warmup, cfg.scheduler)
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = cfg.resolved_lr() * factor
    run.optimizer.step()
    if run.rank_allocator is not None:  # AdaLoRA prunes ranks from the gradients' sensitivity
        run.rank_allocator(state.step)
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    elapsed = run.train_time()
    mean_loss = state.window_loss / max(state.window_n, 1)
    if state.step % cfg.log_every == 0:
        record = {
            "step": state.step, "epoch": round(state.batch_no / run.plan.batches_per_epoch, 4),
            "loss": round(mean_loss, 5), "lr": cfg.resolved_lr() * factor,
            "samples_per_s": round(state.seen / elapsed, 2), "tokens_per_s": round(state.tokens / elapsed, 1),
        }  # fmt: skip
        _write(run.log, record)
        if run.on_log is not None:
            run.on_log(record)
    run.bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{state.seen / elapsed:.1f}")
    if state.step % cfg.log_every == 0:
        state.window_loss, state.window_n = 0.0, 0


def _evaluate(run: _Run) -> bool:
    """One validation pass: record it, keep the weights if it is the best so far; True to stop early."""
    cfg, state, result, task = run.cfg, run.state, run.result, run.task
    eval_started = time.perf_counter()
    feed = (lambda b, w: run.features.feed("validation", b, w, run.device)) if run.features is not None else None
    val_logits = sharded_logits(
        run.model,
        run.val_ids,
        run.pad_id,
        max(cfg.batch_size, 32),
        run.precision,
        run.device,
        run.group,
        feed,
    )
    if run.val_pool is not None:
        val_logits = run.val_pool(val_logits)
    # Multi-label: thresholds tuned on these rows, as they will be for the saved model, so epochs compare
    # by how well they separate the classes rather than by a fixed 0.5 cut.
    scored = task.with_tuned_thresholds(run.val_labels, val_logits, len(run.class_names), cfg.threshold)
    metrics = scored.metrics(run.val_labels, task.in_training_units(val_logits), run.class_names, brief=True)
    record = {
        "epoch": round(state.batch_no / run.plan.batches_per_epoch, 4),
        "step": state.step,
        **metrics,
    }
    result.history.append(record)
    _write(run.log, {"eval": record})
    if run.group.primary:
        _print(
            run.bar,
            f"epoch {record['epoch']:.2f}  val_loss {metrics['loss']:.4f}  " + brief(metrics),
        )
    run.started += time.perf_counter() - eval_started  # throughput counts training only
    if run.on_eval is not None:
        run.on_eval(record)
    if _better(run.metric, metrics[run.metric], result.best and result.best[run.metric]):
        result.best, result.best_val_logits = record, val_logits
        state.best_state = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        state.bad_evals = 0
        return False
    state.bad_evals += 1
    result.stopped_early = bool(cfg.early_stopping and state.bad_evals >= cfg.early_stopping)
    return result.stopped_early


def _checkpoint_if_due(run: _Run, stepped: bool, batch_in_epoch: int, epoch_rng: torch.Tensor) -> None:
    """After an optimiser step, when the checkpointer says it is time (never after the last batch)."""
    state, group, total = run.state, run.group, run.plan.total_batches
    due = (
        run.checkpointer is not None
        and stepped
        and state.batch_no < total
        and run.checkpointer.due(state.step, state.batch_no % run.plan.batches_per_epoch == 0)
    )
    if group.sharded and stepped and state.batch_no < total:
        due = distributed.agree(group, due)  # gathering the state is collective under FSDP
    if not due:
        return
    if run.log is not None:
        run.log.flush()
    saved = state.to_checkpoint(
        batch_in_epoch=batch_in_epoch, epoch_rng=epoch_rng, train_seconds=run.train_time(), result=run.result,
        model=run.model, optimizer=run.optimizer, group=group, log_path=run.log_path,
    )  # fmt: skip
    if run.checkpointer is not None:  # rank 0
        run.checkpointer.save(saved)


def _finish(run: _Run) -> TrainResult:
    """Throughput figures into the result, and the best evaluation's weights back into the model."""
    result, state = run.result, run.state
    result.train_seconds = run.train_time()
    result.wall_seconds = state.trained_before + time.perf_counter() - run.wall_started
    result.samples_per_second = state.seen / result.train_seconds if state.seen else 0.0
    result.tokens_per_second = state.tokens / result.train_seconds if state.seen else 0.0
    result.padding_fraction = 1 - state.real / state.positions if state.positions else 0.0
    result.steps = state.step
    if state.best_state is not None:
        distributed.load_params(run.model, state.best_state)
    run.model.eval()
    return result
