"""One typed run configuration shared by the CLI, the Python API and YAML files.

Every field is a CLI flag (``lora_r`` -> ``--lora-r``) and a YAML key; its ``help`` metadata is the
``--help`` text. The resolved config is written next to every artifact (``adaptext.json``) and can
be re-run as is with ``adaptext train --config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaptext.errors import AdaptextError

METHODS = (
    "lora", "dora", "rslora", "adalora", "ia3", "vera", "loha", "lokr",
    "prompt", "prefix", "ptuning", "bitfit", "head", "full",
)  # fmt: skip
POOLINGS = ("auto", "mean", "native")  # what each means: adaptext.pooling
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what each means: adaptext.precision
SCHEDULERS = ("linear", "cosine", "constant")
LONG_TEXT = ("head+tail", "truncate", "sliding")
WINDOW_POOLS = ("mean", "max")
TASKS = ("auto", "single-label", "multi-label", "regression")
# Selection metrics each task reports (``--metric``); "auto" picks the task's usual one (adaptext.tasks).
TASK_METRICS = {
    "single-label": ("accuracy", "macro_f1", "weighted_f1", "loss"),
    "multi-label": ("micro_f1", "macro_f1", "weighted_f1", "subset_accuracy", "loss"),
    "regression": ("rmse", "mae", "r2", "pearson", "spearman", "loss"),
}
METRICS = ("auto", *dict.fromkeys(m for names in TASK_METRICS.values() for m in names))
LOSSES = ("auto", "cross-entropy", "focal", "contrastive")
HEAD_INITS = ("auto", "probe", "random")
HEAD_REFITS = ("auto", "on", "off")
MIN_STEPS = 100  # measured: docs/RESULTS.md "Few labels"
SMALL_DATA = 300  # fewer training examples than this: no validation carved (a tenth would be < 30 examples)
MAX_FOCAL_GAMMA = 10.0
FEATURE_CACHE = ("auto", "off")
SHARDING = ("none", "full", "grad-op")
REPORT_TO = ("tensorboard", "mlflow")  # each is also the package it needs (adaptext.reporting)
# Methods whose adapted layers can be limited (peft layers_to_transform), plus full fine-tuning.
TOP_LAYER_METHODS = ("lora", "dora", "rslora", "adalora", "vera", "loha", "lokr", "full")
# Methods that would adapt only the top third of the layers unless told otherwise. Empty: measured,
# the top layers cost accuracy at a few hundred examples (docs/RESULTS.md, "Top layers").
AUTO_TOP_METHODS: tuple[str, ...] = ()

# LoRA trains a tiny low-rank update and a fresh head, so it wants a much higher learning rate than
# full fine-tuning (peft #1948). These defaults were measured on AG News with MiniLM (docs/RESULTS.md).
DEFAULT_LR = {
    "lora": 2e-3, "dora": 2e-3, "rslora": 1e-3, "adalora": 2e-3, "ia3": 1e-2, "vera": 1e-2,
    "loha": 2e-3, "lokr": 2e-3, "prompt": 3e-2, "prefix": 1e-2, "ptuning": 1e-2,
    "bitfit": 2e-3, "head": 5e-3, "full": 5e-5,
}  # fmt: skip


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults reach good accuracy without tuning."""

    # --- data
    data: str | None = _f(
        None,
        "Dataset: a Hub dataset name, a CSV/TSV/JSON/JSONL/Parquet file, or a directory of "
        "train.*/validation.*/test.* files. Omitted: the built-in news-headline demo set.",
    )
    data_subset: str | None = _f(None, "Hub dataset configuration name (load_dataset's 2nd argument).")
    text_column: list[str] | None = _f(
        None, "Text column(s); several are joined with a space. Default: auto-detect ('text', ...)."
    )
    label_column: str | None = _f(None, "Label column. Default: auto-detect ('label', ...).")
    task: str = _f(
        "auto",
        "single-label (one class per text), multi-label (any set of classes per text: list cells, or strings "
        "split at --label-separator; sigmoid + binary cross-entropy, per-class thresholds tuned on validation) "
        "or regression (a real number per text; mean squared error). auto: multi-label when label cells are "
        "lists, regression when labels are non-integer numbers, else single-label.",
    )
    label_separator: str | None = _f(
        None,
        "Multi-label labels given as strings: the separator between a row's labels (e.g. ',' for "
        "'sports,politics'); setting it implies --task multi-label. Default: list cells only.",
    )
    threshold: float | None = _f(
        None,
        "Multi-label: predict a class when its probability reaches this (every class). Default: a threshold "
        "per class, tuned on the validation split for that class's F1.",
    )
    train_split: str = _f("train", "Name of the training split.")
    validation_split: str | None = _f(
        None,
        "Name of the validation split. Default: 'validation', 'valid' or 'dev' if present, "
        "else carved (stratified) from train.",
    )
    validation_fraction: float = _f(0.1, "Share of train carved out for validation when none exists.")
    validation_min_train: int = _f(
        SMALL_DATA,
        "Single-label: carve a validation split (when the data has none) only from at least this many training "
        "examples. Below, "
        "a tenth would be too few to pick an epoch by and too many to lose: every example trains, for a fixed "
        "schedule (see --min-steps), and the final weights are kept. 0: always carve.",
    )
    train_size: str | int | None = _f(
        None,
        "Train on a sample of the training split: N examples (stratified), or N/class (e.g. 8/class: N of each "
        "class, fewer where a class has fewer). With N/class nothing outside the sample is used, not even for "
        "validation: the budget is every labelled example the run sees.",
    )
    eval_size: int | None = _f(None, "Use a stratified sample of this many validation examples.")
    test_size: int | None = _f(None, "Use a stratified sample of this many test examples.")
    data_seed: int | None = _f(None, "Seed for sampling and splitting the data. Default: --seed.")
    encoding: str = _f("utf-8", "Text encoding of CSV/TSV/JSON files.")
    # --- model
    model: str = _f(
        "minilm",
        "Base model: a Hub id, a local directory, or an alias (minilm, mpnet).",
    )
    pooling: str = _f(
        "auto",
        "How token vectors become the vector the head reads: mean (masked mean of the last hidden states), native "
        "(the model class's own: first token or BERT's pooler; last token for decoders), or auto (what the encoder "
        "was trained with: mean for sentence-transformers models that declare it, such as minilm and mpnet; else "
        "native). A mean-pooled model reloads mean-pooled through adaptext; plain transformers pools natively.",
    )
    max_length: int = _f(256, "Cut texts to this many tokens (batches are padded dynamically).")
    long_text: str = _f(
        "head+tail",
        "Texts longer than --max-length: head+tail keeps the first quarter and the last three quarters "
        "of the tokens (the end of a review carries its verdict); truncate keeps the beginning; sliding cuts "
        "the whole text into overlapping windows of --max-length tokens (special tokens included): every window "
        "trains as an example with its text's label, and a text's prediction pools its windows' logits.",
    )
    stride: int | None = _f(
        None,
        "With --long-text sliding: tokens that consecutive windows share (the overlap, as in Hugging Face "
        "tokenizers' stride; a window advances by its text tokens minus this). Default: a quarter of --max-length.",
    )
    window_pool: str = _f(
        "mean",
        "With --long-text sliding: how a text's window logits become its logits: mean (every part of the text "
        "counts) or max (per class, its strongest window).",
    )
    max_windows: int = _f(
        0,
        "With --long-text sliding: at most this many windows per text, spread evenly from the first to the last "
        "(the same in training and prediction); 0: every window.",
    )
    # --- parameter-efficient method
    method: str = _f(
        "lora",
        "What to train besides the head: lora, dora, rslora, adalora, ia3, vera, loha, lokr (peft adapters), "
        "prompt, prefix, ptuning (virtual tokens), bitfit (biases), head (head only), full (everything).",
    )
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input.")
    target_modules: list[str] | None = _f(
        None, "Modules to adapt. Default: per-architecture attention projections, else all-linear."
    )
    layers: list[int] | None = _f(None, "Adapt only these layer indices (peft layers_to_transform).")
    top_layers: int | None = _f(
        None,
        "Adapt only the top K transformer layers (LoRA-family and full); the frozen layers below run "
        "once and are cached (see --feature-cache): faster, at some accuracy on small data (docs/RESULTS.md, "
        "'Top layers'). Default: every layer.",
    )
    feature_cache: str = _f(
        "auto",
        "auto: when nothing trains below some layer (head-only, --top-layers, --layers), run the layers "
        "below it once and train on their cached outputs; off: recompute them every step.",
    )
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    vera_r: int = _f(256, "VeRA rank (its shared random matrices want a high rank).")
    virtual_tokens: int = _f(20, "Virtual tokens for prompt, prefix and ptuning.")
    # --- optimisation
    lr: float | None = _f(None, "Peak learning rate. Default depends on method: " + str(DEFAULT_LR))
    epochs: float = _f(3, "Training epochs (fractions allowed; 0 saves and scores the untrained model).")
    min_steps: int = _f(
        MIN_STEPS,
        "Train at least this many optimiser steps: on small data, --epochs is raised to reach it (the line "
        "'schedule:' says so). 0: exactly --epochs.",
    )
    head_init: str = _f(
        "auto",
        "How the new head's output layer starts: probe (a logistic regression fitted on the frozen encoder's "
        "features of the training examples, then fine-tuned: LP-FT), random, or auto (probe for single-label "
        "training with mean pooling, where it was measured; else random, and random with --epochs 0; multi-label "
        "starts at the class rates, regression at the mean).",
    )
    head_refit: str = _f(
        "auto",
        "Single-label: after training, fit the output layer again as a logistic regression on the trained "
        "encoder's features (SetFit's second stage). With a validation split the refit is kept only if it "
        "scores a higher validation accuracy than the trained head; without one it is kept. auto: on where the "
        "head started as a probe (see --head-init); on: for every single-label run; off: never.",
    )
    batch_size: int = _f(16, "Examples per optimiser step (before accumulation).")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = _f(0.06, "Share of steps for linear warm-up.")
    warmup_steps: int | None = _f(None, "Warm-up steps (overrides --warmup-ratio).")
    scheduler: str = _f("linear", "Learning-rate schedule: " + ", ".join(SCHEDULERS) + ".")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    class_weights: bool = _f(
        False, "Weight the loss by inverse class frequency (with --loss focal: the weights are focal's alpha)."
    )
    loss: str = _f(
        "auto",
        "Training loss. cross-entropy; focal (Lin et al. 2017: scales each example's cross-entropy by "
        "(1 - p_true)^gamma, so examples the model already gets right count less; for skewed classes); contrastive "
        "(single-label: the encoder learns from a supervised contrastive loss alone, same class together and the "
        "rest apart, for a fixed schedule, and the head is refitted by logistic regression after training: "
        "SetFit's recipe, measured best under a few hundred examples); auto: contrastive where the head starts as "
        "a probe and there is no validation split (small single-label data, see --validation-min-train), else "
        "cross-entropy.",
    )
    focal_gamma: float = _f(
        2.0, f"Focal loss focusing exponent gamma, 0 to {MAX_FOCAL_GAMMA:g} (0 is cross-entropy; with --loss focal)."
    )
    contrastive: float | None = _f(
        None,
        "Single-label: weight of a supervised contrastive loss added to cross-entropy (same-class rows of a batch "
        "pulled together on the unit-normalised pooled vectors, the rest pushed apart: SetFit's signal, inside "
        "ordinary batches; with --loss contrastive it is the whole loss); 0 turns it off. Default: 1 with mean pooling (sentence-transformers encoders, where "
        "it was measured: docs/RESULTS.md 'Few labels'), else 0. With several processes each computes it on its "
        "own rows of the batch.",
    )
    contrastive_temperature: float = _f(0.1, "Temperature of the contrastive loss (lower: sharper).")
    metric: str = _f(
        "auto",
        "Metric for best-checkpoint selection (and early stopping, and tune's objective). auto: loss (single-label; "
        "validation cross-entropy, steadier than accuracy on a few hundred examples), micro_f1 (multi-label), "
        "rmse (regression). Also: accuracy, macro_f1, weighted_f1; subset_accuracy (multi-label); mae, r2, "
        "pearson, spearman (regression).",
    )
    early_stopping: int | None = _f(None, "Stop after this many evaluations without improvement.")
    evals_per_epoch: int = _f(1, "Validation passes per epoch.")
    precision: str = _f(
        "auto",
        "auto (bf16 on GPUs and on CPUs with bf16 instructions, AMX or AVX512-BF16; else fp32; the environment "
        "variable ADAPTEXT_PRECISION decides it for a whole run), fp32, bf16 or fp16.",
    )
    compile: bool = _f(
        False,
        "torch.compile the model for training: a slow first minute, then faster steps (mostly on GPU). "
        "Batch widths are bucketed to multiples of 32 so only a few shapes compile.",
    )
    shard: str = _f(
        "none",
        "Under torchrun, shard the model with FSDP: full (parameters, gradients and optimiser state, like "
        "ZeRO-3), grad-op (gradients and optimiser state; parameters stay gathered between forward and "
        "backward, like ZeRO-2), none (every process holds the whole model). An accelerate FSDP config sets it.",
    )
    seed: int = _f(42, "Random seed: same seed, same data, same result.")
    # --- output
    output: str | None = _f(None, "Output directory (a standard PEFT adapter directory).")
    overwrite: bool = _f(False, "Replace an existing output directory.")
    resume: bool = _f(
        False, "Continue the interrupted run in --output from its last checkpoint (give the same options)."
    )
    checkpoint_steps: int | None = _f(
        None,
        "Checkpoint into OUTPUT/checkpoint every N optimiser steps and at every epoch end "
        "(default: about once a minute of training; 0: epoch ends only).",
    )
    log_every: int = _f(10, "Write a JSONL log line every N optimiser steps.")
    report_to: list[str] | None = _f(
        None,
        "Log while training to tensorboard (OUTPUT/runs), mlflow (MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db) or "
        "both (tensorboard,mlflow): the loss, lr and throughput every --log-every steps, every validation figure, "
        "and the saved model's metrics.",
    )
    tensorboard: bool = _f(False, "Deprecated alias of --report-to tensorboard.")

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_stride(max_length: int, stride: int | None) -> int:
    """The overlap of consecutive sliding windows: as given, else a quarter of the window."""
    return stride if stride is not None else max_length // 4


def field_help(cls: type = TrainConfig) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AdaptextError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(choices)}")


def _coerce(name: str, kind: str, value: Any) -> Any:
    """One value as its field's type. YAML hands over strings for numbers it does not recognise (PyYAML
    reads ``2e-3`` as a string: it wants ``2.0e-3``) and the Python API takes anything."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        if "None" in kind:
            return None
        raise AdaptextError(f"{flag} needs a value (got none)")
    base = kind.split("|")[0].strip()
    if base.startswith("list"):
        values = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(name, base[5:-1], v) for v in values]
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise AdaptextError(f"{flag} must be true or false (got {value!r})")
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise AdaptextError(f"{flag} must be a single value (got {value!r})")
    number = float if base == "float" else int
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AdaptextError(f"{flag} must be a number (got {value!r})")
    try:
        converted = float(value)
    except (ValueError, OverflowError):
        raise AdaptextError(f"{flag} must be a number (got {value!r})") from None
    if not math.isfinite(converted):
        raise AdaptextError(f"{flag} must be a finite number (got {value!r})")
    if number is int:
        if not converted.is_integer():
            raise AdaptextError(f"{flag} must be a whole number (got {value!r})")
        return int(converted)
    return int(value) if isinstance(value, int) else converted


PER_CLASS = "/class"


def parse_train_size(value: Any) -> int | str | None:
    """--train-size as given: N (an int) or "N/class" (kept as that string, N >= 1)."""
    if isinstance(value, str) and value.strip().lower().replace(" ", "").endswith(PER_CLASS):
        count = value.strip().lower().replace(" ", "")[: -len(PER_CLASS)]
        if not count.isdigit() or int(count) < 1:
            raise AdaptextError(f"--train-size {value!r}: write N/class with N a whole number >= 1, e.g. 8/class")
        return f"{int(count)}{PER_CLASS}"
    if isinstance(value, str) and "/" in value:
        raise AdaptextError(f"--train-size {value!r}: write N (examples) or N/class (examples of each class)")
    return _coerce("train_size", "int | None", value)


def per_class(train_size: int | str | None) -> int | None:
    """N of an "N/class" train size, else None."""
    return int(train_size[: -len(PER_CLASS)]) if isinstance(train_size, str) else None


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field once, at the edge, so later stages can trust the config."""
    for f in dataclasses.fields(cfg):
        if f.name == "train_size":
            cfg.train_size = parse_train_size(cfg.train_size)
            continue
        setattr(cfg, f.name, _coerce(f.name, str(f.type), getattr(cfg, f.name)))
    _check_choice("method", cfg.method, METHODS)
    _check_choice("precision", cfg.precision, PRECISIONS)
    _check_choice("pooling", cfg.pooling, POOLINGS)
    _check_choice("head_init", cfg.head_init, HEAD_INITS)
    _check_choice("head_refit", cfg.head_refit, HEAD_REFITS)
    _check_choice("scheduler", cfg.scheduler, SCHEDULERS)
    _check_choice("long_text", cfg.long_text, LONG_TEXT)
    _check_choice("window_pool", cfg.window_pool, WINDOW_POOLS)
    _check_choice("metric", cfg.metric, METRICS)
    _check_choice("task", cfg.task, TASKS)
    _check_task(cfg)
    _check_choice("loss", cfg.loss, LOSSES)
    if cfg.loss == "contrastive" and cfg.head_refit == "off":
        raise AdaptextError("--loss contrastive trains no head (it is refitted after training): drop --head-refit off")
    if cfg.loss == "contrastive" and cfg.contrastive == 0:
        raise AdaptextError("--loss contrastive with --contrastive 0 has nothing to learn from: drop one of them")
    _check_choice("feature_cache", cfg.feature_cache, FEATURE_CACHE)
    _check_choice("shard", cfg.shard, SHARDING)
    _check_report_to(cfg)
    if cfg.top_layers:
        if cfg.top_layers < 0:
            raise AdaptextError(f"--top-layers must be >= 0 (got {cfg.top_layers}); 0 adapts every layer")
        if cfg.layers:
            raise AdaptextError("--top-layers and --layers both choose layers; pass only one of them")
        if cfg.method not in TOP_LAYER_METHODS:
            raise AdaptextError(
                f"--top-layers does not apply to --method {cfg.method}; use it with {', '.join(TOP_LAYER_METHODS)}"
            )
    if cfg.epochs is None or cfg.epochs < 0:
        raise AdaptextError(f"--epochs must be >= 0 (got {cfg.epochs}); 0 evaluates the untrained model")
    positive = {
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length,
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "log_every": cfg.log_every,
        "evals_per_epoch": cfg.evals_per_epoch,
        "vera_r": cfg.vera_r,
        "virtual_tokens": cfg.virtual_tokens,
    }
    if cfg.contrastive is not None and cfg.contrastive < 0:
        raise AdaptextError(f"--contrastive must be >= 0 (got {cfg.contrastive}); 0 turns it off")
    if cfg.contrastive_temperature <= 0:
        raise AdaptextError(f"--contrastive-temperature must be > 0 (got {cfg.contrastive_temperature})")
    for name in ("min_steps", "validation_min_train"):
        if getattr(cfg, name) < 0:
            raise AdaptextError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")
    for name, value in positive.items():
        if value is None or value <= 0:
            raise AdaptextError(f"--{name.replace('_', '-')} must be > 0 (got {value})")
    for name in (
        ("eval_size", "test_size") if isinstance(cfg.train_size, str) else ("train_size", "eval_size", "test_size")
    ):
        value = getattr(cfg, name)
        if value is not None and value < 2:
            raise AdaptextError(f"--{name.replace('_', '-')} must be at least 2 (got {value})")
    for name in ("seed", "data_seed"):  # numpy's and sklearn's seeds are 32-bit unsigned
        value = getattr(cfg, name)
        if value is not None and not 0 <= value < 2**32:
            raise AdaptextError(f"--{name.replace('_', '-')} must be between 0 and {2**32 - 1} (got {value})")
    _check_windows(cfg)
    if cfg.lr is not None and not 0 < cfg.lr < 1:
        raise AdaptextError(f"--lr must be between 0 and 1 (got {cfg.lr})")
    if not 0 < cfg.validation_fraction < 1:
        raise AdaptextError("--validation-fraction must be between 0 and 1")
    if not 0 <= cfg.warmup_ratio < 1:
        raise AdaptextError("--warmup-ratio must be in [0, 1)")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise AdaptextError(f"--warmup-steps must be >= 0 (got {cfg.warmup_steps})")
    if not 0 <= cfg.lora_dropout < 1:
        raise AdaptextError("--lora-dropout must be in [0, 1)")
    if cfg.checkpoint_steps is not None and cfg.checkpoint_steps < 0:
        raise AdaptextError(f"--checkpoint-steps must be >= 0 (got {cfg.checkpoint_steps})")
    if cfg.resume and not cfg.output:
        raise AdaptextError("--resume needs --output DIR: the directory of the interrupted run")
    if cfg.resume and cfg.overwrite:
        raise AdaptextError("--resume continues a run and --overwrite starts it over; pass one of them")
    if cfg.resume and cfg.method == "adalora":
        raise AdaptextError("--resume does not support adalora (its rank allocator is not checkpointed); rerun it")
    if not 0 <= cfg.focal_gamma <= MAX_FOCAL_GAMMA:
        raise AdaptextError(
            f"--focal-gamma must be between 0 and {MAX_FOCAL_GAMMA:g} (got {cfg.focal_gamma}); 2 is the usual choice"
        )
    return cfg


def _check_task(cfg: TrainConfig) -> None:
    """Task options that contradict each other (the data decides the rest once it is read)."""
    if cfg.label_separator is not None:
        if cfg.label_separator == "":
            raise AdaptextError("--label-separator must not be empty; e.g. --label-separator ','")
        if cfg.task not in ("auto", "multi-label"):
            raise AdaptextError(f"--label-separator applies to multi-label data, not --task {cfg.task}")
        cfg.task = "multi-label"
    if cfg.threshold is not None:
        if cfg.task not in ("auto", "multi-label"):
            raise AdaptextError(f"--threshold applies to multi-label data, not --task {cfg.task}")
        if not 0 < cfg.threshold < 1:
            raise AdaptextError(f"--threshold must be between 0 and 1 (got {cfg.threshold}); 0.5 is the usual cut")
    if cfg.task == "regression":
        check_regression_options(cfg)


def _check_report_to(cfg: TrainConfig) -> None:
    """Known loggers whose packages are installed: a missing one is refused now, not after the training."""
    wanted = list(dict.fromkeys(cfg.report_to or []))
    for name in wanted:
        _check_choice("report_to", name, REPORT_TO)
    if cfg.tensorboard and "tensorboard" not in wanted:  # the older spelling
        wanted.append("tensorboard")
    for name in wanted:
        if not _importable(name):
            raise AdaptextError(f"--report-to {name} needs the {name} package; pip install {name}")
    cfg.report_to = wanted or None


def _importable(module: str) -> bool:
    """Whether ``import module`` can find it, asked of the same finders an import asks (none imported here)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it; a module set to None in sys.modules
        return False


def check_regression_options(cfg: TrainConfig) -> None:
    """Class weights and focal loss are about classes: a regression run refuses them."""
    for flag, used in (
        ("--class-weights", cfg.class_weights),
        (f"--loss {cfg.loss}", cfg.loss in ("focal", "contrastive")),
    ):
        if used:
            raise AdaptextError(f"{flag} applies to classification; drop it for regression (mean squared error)")


def _check_windows(cfg: TrainConfig) -> None:
    if cfg.long_text != "sliding":
        given = [f"--{n.replace('_', '-')}" for n, default in WINDOW_DEFAULTS.items() if getattr(cfg, n) != default]
        if given:
            raise AdaptextError(f"{', '.join(given)} applies to --long-text sliding only (now {cfg.long_text!r})")
        return
    if cfg.stride is not None and not 0 <= cfg.stride < cfg.max_length:
        raise AdaptextError(
            f"--stride {cfg.stride}: the overlap of consecutive windows must be at least 0 and less than "
            f"--max-length {cfg.max_length} (default: a quarter of it, {cfg.max_length // 4})"
        )
    if cfg.max_windows is None or cfg.max_windows < 0:
        raise AdaptextError(f"--max-windows must be >= 0 (got {cfg.max_windows}); 0 keeps every window")


# The sliding-window options, at the values that mean "no windows" (also what models saved before them read as).
WINDOW_DEFAULTS: dict[str, Any] = {"stride": None, "window_pool": "mean", "max_windows": 0}


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from a mapping, rejecting unknown keys with a did-you-mean hint."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            fix = f"; did you mean {hint[0]!r}?" if hint else ""
            raise AdaptextError(f"{source}: unknown option {key!r}{fix}")
    cfg = TrainConfig(**values)
    for f in dataclasses.fields(TrainConfig):  # YAML may give a scalar where a list is expected
        value = getattr(cfg, f.name)
        if "list" in str(f.type) and value is not None and not isinstance(value, list):
            setattr(cfg, f.name, [value])
    return cfg


# What a model saved before an option existed did, filled in when its adaptext.json is read. Not always
# today's default: --long-text became head+tail, but models saved before the option truncated.
SAVED_BEFORE: dict[str, Any] = {"long_text": "truncate", "stride": None, "window_pool": "mean", "max_windows": 0}


def saved_config(values: dict[str, Any]) -> TrainConfig:
    """A saved model's training config (adaptext.json's ``config``) as a TrainConfig, read once on load:
    an option the model predates gets what models of its time did (``SAVED_BEFORE``), else today's
    default; no validation (it was validated when the model was trained)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**SAVED_BEFORE, **{k: v for k, v in values.items() if k in known}})


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a mapping of option -> value."""
    path = Path(path)
    if not path.is_file():
        raise AdaptextError(f"config file {str(path)!r} not found; check the path given to --config")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise AdaptextError(f"config file {str(path)!r} is not valid YAML ({first}); fix its syntax") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AdaptextError(f"config file {str(path)!r} must hold a mapping of option: value")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise AdaptextError(f"config file {str(path)!r}: option names must be words, not {bad[0]!r}; fix that key")
    return {k.replace("-", "_"): v for k, v in values.items()}


def save(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")


# Keys a preset or config file may carry besides the training options: used by `adaptext compare`.
STUDY_KEYS = ("methods", "seeds", "arms", "train_sizes")


def preset_names() -> list[str]:
    from importlib.resources import files

    return sorted(
        p.name.removesuffix(".yaml")
        for p in files("adaptext").joinpath("presets").iterdir()
        if p.name.endswith(".yaml")
    )


def load_preset(name: str) -> dict[str, Any]:
    """A shipped recipe (``adaptext/presets/NAME.yaml``), or a YAML file of options such as a tune
    study's ``best.yaml``, as a mapping of options; ``description`` dropped."""
    from importlib.resources import files

    if name.endswith((".yaml", ".yml", ".json")) or "/" in name or "\\" in name:
        if not Path(name).is_file():
            raise AdaptextError(
                f"preset file {name!r} not found; give a shipped preset ({', '.join(preset_names())}) or a .yaml file"
            )
        values = load_file(name)
        values.pop("description", None)
        return values
    if name not in preset_names():
        hint = difflib.get_close_matches(name, preset_names(), n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "choose from " + ", ".join(preset_names())
        raise AdaptextError(f"unknown preset {name!r}; {fix} (or give the path of a .yaml file of options)")
    values = yaml.safe_load(files("adaptext").joinpath("presets", f"{name}.yaml").read_text(encoding="utf-8"))
    values.pop("description", None)
    return values


def split_study(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate training options from study keys (methods, seeds, arms)."""
    study = {k: values[k] for k in STUDY_KEYS if k in values}
    return {k: v for k, v in values.items() if k not in STUDY_KEYS}, study
