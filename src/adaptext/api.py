"""The plain functions behind every CLI command: train, evaluate, predict_file."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from adaptext import artifacts, checkpoint, config, data, distributed, models, options, policy, probe, reporting, tasks
from adaptext import cache as feature_cache
from adaptext.artifacts import library_versions, peak_rss_mb
from adaptext.batching import pick_device, seed_everything
from adaptext.card import model_card
from adaptext.distributed import sharded_logits
from adaptext.errors import names
from adaptext.metrics import format_report, save_confusion_png
from adaptext.pooling import of as pooling_of
from adaptext.precision import resolve as resolve_precision
from adaptext.stack import adapted_layers, num_layers
from adaptext.tasks import Task
from adaptext.token_store import encode as encode_rows
from adaptext.train import train_loop
from adaptext.train_state import TrainResult, planned_epochs, planned_steps
from adaptext.windows import Windowing


@dataclass
class TrainOutcome:
    output: Path
    metrics: dict[str, Any]
    meta: dict[str, Any]


def resolve_config(cfg: config.TrainConfig | dict[str, Any] | None = None, **overrides: Any) -> config.TrainConfig:
    if cfg is None:
        cfg = config.TrainConfig()
    elif isinstance(cfg, dict):
        cfg = options.from_dict(cfg)
    if overrides:
        cfg = options.from_dict({**cfg.to_dict(), **overrides}, source="arguments")
    return options.validate(cfg)


def train(
    cfg: config.TrainConfig | dict[str, Any] | None = None,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> TrainOutcome:
    """Fine-tune, evaluate and save. Returns the output directory and its metrics.

    Under ``torchrun`` (or ``accelerate launch``) the processes train together (see adaptext.distributed);
    only rank 0 prints and writes. ``on_eval`` receives every validation record as it is made (see
    adaptext.train.train_loop); an exception it raises stops the run and no model is saved (``report_to``
    logs so far stay in the output directory, see adaptext.reporting).
    """
    cfg = resolve_config(cfg, **overrides)
    group = distributed.setup(cfg.shard)
    cfg.shard = group.shard  # as an accelerate FSDP config may have set it: checkpoints and run_config record it
    if not group.primary:
        echo, progress = (lambda line: None), False
    try:
        outcome = _train(cfg, progress, echo, group, on_eval)
    except BaseException:
        distributed.teardown(group, clean=False)
        raise
    distributed.teardown(group)
    return outcome


def _train(
    cfg: config.TrainConfig,
    progress: bool,
    echo: Callable[[str], None],
    group: distributed.Group,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> TrainOutcome:
    """The recipe: load data, build the model, decide the schedule, train, score, save."""
    if cfg.output is None:
        cfg.output = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        Path("runs").mkdir(exist_ok=True)
    output, resume_state = checkpoint.prepare_output(cfg, echo)
    seed_everything(cfg.seed)
    models.quiet_transformers()

    source = models.resolve_model(cfg.model)
    dataset, task = _load_data(cfg, echo)
    tokenizer = models.load_tokenizer(source)
    # Tokenised first: with sliding windows the number of training rows (and so of steps) depends on it.
    windowing = Windowing.from_config(cfg)
    encoded = {  # flat arrays; large splits tokenised once into the token cache (adaptext.token_store)
        name: encode_rows(windowing, tokenizer, split.texts, cfg.token_cache, echo, f"{name} texts")
        for name, split in dataset.splits.items()
    }
    train_labels = encoded["train"].per_row(dataset.splits["train"].labels)
    built = _build_model(cfg, source, dataset, task, tokenizer.pad_token_id, train_labels, echo)
    model, task = built.model, built.task
    plan = _plan(cfg, built, group, dataset, encoded, train_labels, tokenizer.pad_token_id, windowing, echo)

    stage = artifacts.staged_dir(output) if group.primary else _scratch_dir()
    report_to = cfg.report_to if group.primary else None
    with (
        stage as staging,
        reporting.Reporter(report_to, output, cfg.to_dict(), echo, resume_state is not None) as reporter,
    ):
        validation = encoded.get("validation") if plan.selects else None
        result = train_loop(
            model,
            encoded["train"].ids,
            train_labels,
            validation.ids if validation is not None else [],
            dataset.splits["validation"].labels if validation is not None else [],
            dataset.class_names,
            tokenizer.pad_token_id,
            dataclasses.replace(cfg, loss=plan.loss),
            staging / "train_log.jsonl" if group.primary else None,
            progress,
            plan.features,
            checkpointer=checkpoint.Checkpointer(output, cfg.to_dict(), cfg.checkpoint_steps)
            if group.primary and cfg.method != "adalora"
            else None,
            resume=resume_state,
            group=group,
            val_pool=(lambda logits: windowing.pool_logits(logits, validation)) if windowing.sliding else None,
            on_eval=reporter.with_eval(on_eval),
            on_log=reporter.log_step,
            task=task,
            contrastive=plan.contrast,
        )
        if task.kind == "regression":
            tasks.fold_target_scale(model, task.mean, task.std)
        refit = policy.refit_head(model, cfg, task, plan.head_start["kind"], plan.loss, group, encoded, dataset,
                                  train_labels, plan.precision, tokenizer.pad_token_id, windowing, echo)  # fmt: skip
        metrics: dict[str, Any] = {"history": result.history, "best": result.best}
        task = _score_splits(metrics, model, encoded, dataset, task, result, refit, cfg, plan.precision, plan.device,
                             group, tokenizer.pad_token_id, windowing)  # fmt: skip
        metrics["train"] = _train_record(result, len(train_labels), plan, group)
        meta = _meta(
            cfg, source, built, plan, task, refit, dataset.class_names, tokenizer.pad_token_id, len(train_labels)
        )
        if group.sharded:  # every process gives its shards; rank 0 saves a whole model built from them
            whole = distributed.full_model_state(model)
            if group.primary:
                model = _unsharded(whole, source, dataset, tokenizer.pad_token_id, task, cfg, built.head_modules)
        if group.primary:  # the other processes of a distributed run write nothing
            _save_run(staging, output, model, tokenizer, cfg, built.head_modules, task, dataset.class_names, meta,
                      metrics, echo)  # fmt: skip
            with _extra("the training logs (--report-to)", echo):
                reporter.finish(metrics, result.steps, staging)
    _summarise(metrics, dataset, cfg, task, echo)
    echo(f"saved: {output}")
    return TrainOutcome(output, metrics, meta)


@dataclass
class _Plan:
    """What a run decided before its first step (said in the output, recorded in adaptext.json)."""

    device: torch.device
    precision: str
    head_start: dict[str, Any]  # kind: probe or random; a probe's rows and cross-validated accuracy
    loss: str
    contrast: float  # the contrastive term's weight
    epochs: float
    selects: bool  # validation picks the evaluation whose weights are kept
    features: feature_cache.FeatureCache | None
    cache_note: str


def _plan(
    cfg: config.TrainConfig, built: BuiltModel, group: distributed.Group, dataset: data.TextDataset,
    encoded: dict[str, Any], train_labels: list[Any], pad_id: int, windowing: Windowing, echo: Callable[[str], None],
) -> _Plan:  # fmt: skip
    """Device, precision, the head's start, loss, sharding, schedule and feature cache, each said in a line."""
    model, task = built.model, built.task
    device = group.device() if group.active else pick_device()
    model.to(device)
    precision = resolve_precision(cfg.precision, device)
    head_start: dict[str, Any] = {"kind": policy.head_init(cfg, task, built.pooling)}
    loss = policy.resolve_loss(cfg, task, head_start["kind"], "validation" in encoded)
    contrast = policy.contrastive_weight(cfg, built.pooling, loss) if task.kind == "single-label" else 0.0
    if head_start["kind"] == "probe":  # before sharding: every process fits the same probe on whole weights
        found = probe.fit_head(
            model, encoded["train"].ids, train_labels, dataset.num_labels, pad_id, precision, cfg.seed
        )
        head_start.update(rows=found.rows, cv_accuracy=found.cv_accuracy)
        echo(f"head: starts as a {found.describe()}")
    if group.sharded:
        distributed.shard_for_training(model, cfg, group, echo)
    elif cfg.shard != "none":
        echo(f"shard: --shard {cfg.shard} ignored: a single process has nothing to shard with (launch with torchrun)")
    examples = f"{len(train_labels):,} examples"
    if windowing.sliding:
        examples = (
            f"{len(train_labels):,} windows of {encoded['train'].num_texts:,} texts ({cfg.max_length} tokens, "
            f"overlap {windowing.stride}, {windowing.window_pool}-pooled per text for evaluation)"
        )
    processes = f" in {group.world} processes" if group.active else ""
    auto_loss = cfg.loss == "auto"
    cfg = dataclasses.replace(cfg, loss=loss)  # the schedule depends on the resolved loss (--small-data-epochs)
    epochs = planned_epochs(len(train_labels), cfg)
    echo(
        f"train: {examples} x {epochs:.3g} epochs, batch {cfg.batch_size}, "
        f"lr {cfg.resolved_lr():g}, {precision} on {device.type}{processes}"
    )
    # The contrastive loss trains no head, so validation cannot pick an epoch: the schedule is fixed, and
    # validation scores the refitted head instead (probe.refit_head).
    selects = "validation" in encoded and loss != "contrastive"
    if cfg.epochs > 0:
        term = f"; contrastive term weight {contrast:g}" if contrast else ""
        if loss == "contrastive":
            why = " (--loss auto: small data, no validation split)" if auto_loss else ""
            term = f"; loss: supervised contrastive only{why}, the head is refitted after training"
        echo("schedule: " + policy.schedule_line(cfg, len(train_labels), epochs, selects, task) + term)
    features, cache_note = feature_cache.plan(model, cfg.method, cfg.feature_cache)
    if group.sharded and features is not None:
        features, cache_note = None, "off (with FSDP the frozen layers are sharded: they run every step)"
    if features is not None or built.layers or cfg.method == "head":
        echo(f"feature cache: {cache_note}")
    return _Plan(device, precision, head_start, loss, contrast, epochs, selects, features, cache_note)


def _meta(
    cfg: config.TrainConfig, source: models.ModelSource, built: BuiltModel, plan: _Plan, task: Task,
    refit: probe.Refit | None, class_names: list[str], pad_id: int, rows: int,
) -> dict[str, Any]:  # fmt: skip
    """adaptext.json: what a reload needs (read back through adaptext.artifacts) and what the run decided."""
    return {
        "format_version": artifacts.FORMAT_VERSION,
        "method": cfg.method,
        # The precision training and its evaluations ran in: `adaptext evaluate` in the same one reproduces
        # the training-time metrics (adaptext.precision says how closely in bf16).
        "precision": plan.precision,
        "base_model": source.to_dict(),
        "base_fingerprint": built.fingerprint,
        "pooling": built.pooling,  # installed again on every load (adaptext.pooling)
        "head_init": plan.head_start,
        "contrastive": plan.contrast,
        "loss": plan.loss,
        "head_refit": refit.to_dict() if refit else None,
        "schedule": {
            "epochs": plan.epochs,
            "steps": planned_steps(rows, dataclasses.replace(cfg, loss=plan.loss))[2],
            "validation": plan.selects,
        },
        "head_modules": built.head_modules,
        "target_modules": built.targets,
        "adapted_layers": built.layers,
        "params": built.params.to_dict(),
        "lr": cfg.resolved_lr(),
        "class_names": class_names,
        "task": task.to_meta(),
        "pad_token_id": pad_id,
        "config": cfg.to_dict(),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _summarise(
    metrics: dict[str, Any], dataset: data.TextDataset, cfg: config.TrainConfig, task: Task, echo: Callable[[str], None]
) -> None:
    """The held-out figures in a line each, and a warning when the model is no better than a constant answer."""
    for split in ("validation", "test"):
        if split in metrics:
            echo(f"{split}: " + format_report(metrics[split]).splitlines()[0])
    held_out = next((split for split in ("validation", "test") if split in metrics), None)
    if cfg.epochs > 0 and held_out is not None:
        policy.warn_if_nothing_learned(metrics[held_out], dataset.splits[held_out].labels, cfg, echo, task, held_out)


def _save_run(
    staging: Path, output: Path, model: torch.nn.Module, tokenizer: Any, cfg: config.TrainConfig,
    head_modules: list[str], task: Task, class_names: list[str], meta: dict[str, Any], metrics: dict[str, Any],
    echo: Callable[[str], None] = print,
) -> None:  # fmt: skip
    """The model and everything beside it into the staging folder (renamed to ``output`` once complete)."""
    artifacts.save_model(model, tokenizer, staging, cfg.method, head_modules)
    artifacts.write_json(
        staging / artifacts.LABELS_FILE,
        artifacts.label_map(class_names, tokenizer.pad_token_id, task.problem_type),
    )
    artifacts.write_json(staging / artifacts.META_FILE, meta)
    artifacts.write_json(staging / "metrics.json", metrics)
    (staging / "run_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    # The model is written: what follows is extra, and a failure there costs only itself.
    with _extra("the model card", echo):
        (staging / "README.md").write_text(model_card(meta, metrics, output.name), encoding="utf-8")
    final = metrics.get("test") or metrics.get("validation") or {}
    if "confusion_matrix" in final:
        with _extra("the confusion matrix plot", echo):
            save_confusion_png(
                final["confusion_matrix"],
                class_names,
                staging / "confusion_matrix.png",
                f"{output.name}: {'test' if 'test' in metrics else 'validation'}",
            )


def _score_splits(
    metrics: dict[str, Any], model: torch.nn.Module, encoded: dict[str, Any], dataset: data.TextDataset, task: Task,
    result: TrainResult, refit: probe.Refit | None, cfg: config.TrainConfig, precision: str, device: torch.device,
    group: distributed.Group, pad_id: int, windowing: Windowing,
) -> Task:  # fmt: skip
    """The saved model's validation and test metrics into ``metrics``; the task, with multi-label thresholds
    tuned on validation."""
    eval_batch = max(cfg.batch_size, 64)
    for split in ("validation", "test"):
        if split not in encoded:
            continue
        if (
            split == "validation"
            and result.best_val_logits is not None
            and task.kind != "regression"
            and not (refit and refit.kept)
        ):
            # The saved weights are that evaluation's, so its logits serve (regression's were in
            # standardised units, before the target scale was folded into the head: those run again).
            logits = result.best_val_logits
        else:
            rows = encoded[split]
            logits = sharded_logits(model, rows.ids, pad_id, eval_batch, precision, device, group)
            logits = windowing.pool_logits(logits, rows)
        if split == "validation":  # multi-label: per-class thresholds, tuned here, used on test
            task = task.with_tuned_thresholds(dataset.splits[split].labels, logits, dataset.num_labels, cfg.threshold)
        metrics[split] = task.metrics(dataset.splits[split].labels, logits, dataset.class_names)
        metrics[split]["precision"] = precision  # what computed these logits (adaptext.precision)
    return task


def _train_record(result: TrainResult, rows: int, plan: _Plan, group: distributed.Group) -> dict[str, Any]:
    """metrics.json's ``train``: cost and throughput of the run."""
    return {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "seconds": round(result.train_seconds, 2),
        "wall_seconds": round(result.wall_seconds, 2),
        "samples_per_second": round(result.samples_per_second, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "padding_fraction": round(result.padding_fraction, 4),
        "steps": result.steps,
        "rows": rows,  # training examples: texts, or their windows with --long-text sliding
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
        "precision": plan.precision,
        "device": plan.device.type,
        "processes": group.world,
        "feature_cache": plan.cache_note,
        "cached_layers": plan.features.depth if plan.features is not None else 0,
    }


def _load_data(cfg: config.TrainConfig, echo: Callable[[str], None]) -> tuple[data.TextDataset, Task]:
    """The splits and the task, said in a line or two; options the task cannot use fail here, before any work."""
    dataset = data.load_training_data(cfg)
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in dataset.splits.items())
    echo(f"data: {dataset.source} ({sizes}); {dataset.num_labels} classes: {names(dataset.class_names, 12)}")
    for note in dataset.notes:
        echo(f"data: {note}")
    task = Task(dataset.task)
    if task.kind == "regression":
        options.check_regression_options(cfg)
    task.resolve_metric(cfg.metric)  # a metric the task has no figure for fails here, before any work
    if task.kind == "single-label":
        policy.warn_if_imbalanced(dataset.splits["train"].labels, dataset.class_names, cfg, echo)
    return dataset, task


@dataclass
class BuiltModel:
    """The classifier ready to train, and what building it decided (recorded in adaptext.json)."""

    model: torch.nn.Module
    head_modules: list[str]  # newly initialised: trained and saved with the adapter
    pooling: str
    fingerprint: dict[str, Any]  # of the base weights: a reload checks it
    targets: list[str]  # the adapted modules
    layers: list[int] | None  # the adapted layers (None: every one)
    params: models.ParamCounts
    task: Task  # regression: with the targets' scale


def _build_model(
    cfg: config.TrainConfig, source: models.ModelSource, dataset: data.TextDataset, task: Task, pad_id: int,
    train_labels: list[Any], echo: Callable[[str], None],
) -> BuiltModel:  # fmt: skip
    """Load the base with its new head, wrap it for the method, start the head's bias where the task says."""
    id2label = dict(enumerate(dataset.class_names))
    model, head_modules = models.load_classifier(
        source, dataset.num_labels, id2label, pad_id, task.problem_type, cfg.pooling
    )
    pooling = pooling_of(model)
    fingerprint = artifacts.base_fingerprint(model)
    model, targets = models.prepare(model, cfg, head_modules, planned_steps(len(train_labels), cfg)[2])
    if task.kind == "regression":
        task = policy.target_scale(model, train_labels, echo)
    if task.kind == "multi-label":
        tasks.init_label_priors(model, train_labels, dataset.num_labels)
    params = models.count_params(model, head_modules)
    echo(f"model: {source.name} ({fingerprint['model_type']}, {params.total:,} parameters, {pooling} pooling)")
    echo(f"model: newly initialised, trained and saved: {', '.join(head_modules) or '-'}")
    layers = adapted_layers(model, cfg) if cfg.method in config.TOP_LAYER_METHODS else None
    span = ",".join(map(str, layers or []))
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        span = f"{layers[0]}-{layers[-1]}"
    where = f" in layers {span} of {num_layers(model)}" if layers else ""
    if cfg.method in ("lora", "dora", "rslora"):
        echo(
            f"{cfg.method}: r={cfg.lora_r} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} on {', '.join(targets)}{where}"
        )
    elif targets or layers:
        echo(f"{cfg.method}: on {', '.join(targets) or 'every weight'}{where}")
    echo(
        f"trainable: {params.adapter:,} adapter + {params.head:,} head = {params.trainable:,} "
        f"({params.to_dict()['trainable_percent']:.3f}% of {params.total:,})"
    )

    return BuiltModel(model, head_modules, pooling, fingerprint, targets, layers, params, task)


def _unsharded(
    whole: dict[str, torch.Tensor], source: models.ModelSource, dataset: data.TextDataset, pad_id: int, task: Task,
    cfg: config.TrainConfig, head_modules: list[str],
) -> torch.nn.Module:  # fmt: skip
    """A plain (unsharded) copy of the trained model on the CPU, from the whole weights FSDP gathered."""
    id2label = dict(enumerate(dataset.class_names))
    model, _ = models.load_classifier(source, dataset.num_labels, id2label, pad_id, task.problem_type, cfg.pooling)
    model, _ = models.prepare(model, cfg, head_modules)
    model.load_state_dict(whole)
    return model.eval()


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="adaptext-rank-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _extra(what: str, echo: Callable[[str], None]) -> Iterator[None]:
    """Something written after the model (card, plot, logs): its failure is one warning, not a lost run.
    Only Exception: Ctrl-C still stops the run."""
    try:
        yield
    except Exception as exc:
        echo(f"warning: could not write {what} ({reporting.cause(exc)}): the model is saved")
