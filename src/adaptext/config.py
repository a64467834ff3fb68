"""One typed run configuration shared by the CLI, the Python API and YAML files.

Every field is a CLI flag (``lora_r`` -> ``--lora-r``) and a YAML key; its ``help`` metadata is the
``--help`` text. The resolved config is written next to every artifact (``adaptext.json``) and can
be re-run as is with ``adaptext train --config``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

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
SMALL_DATA_EPOCHS = 12  # with the contrastive loss alone; measured: docs/RESULTS.md "Few labels"
SMALL_DATA = 1000  # fewer training examples than this: no validation carved; measured: docs/RESULTS.md "Few labels"
MAX_FOCAL_GAMMA = 10.0
FEATURE_CACHE = ("auto", "off")
TOKEN_CACHE = ("auto", "on", "off")
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
        "examples. Below, every example trains for a fixed schedule (see --small-data-epochs, --min-steps) and "
        "the final weights are kept: a tenth of a few hundred examples picks epochs badly and costs more than it "
        "gives (measured up to 960 examples: docs/RESULTS.md 'Few labels'). 0: always carve.",
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
    token_cache: str = _f(
        "auto",
        "auto: splits of 10,000 texts or more are tokenised once into $ADAPTEXT_CACHE/tokens (default "
        "~/.cache/adaptext/tokens), keyed by the texts, the tokenizer and the length settings, and later runs "
        "map those files instead of tokenising again; on: every split; off: never.",
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
    small_data_epochs: float = _f(
        SMALL_DATA_EPOCHS,
        "With the contrastive loss alone (--loss auto on small single-label data with no validation split, see "
        "--validation-min-train): train at least this many epochs (the line 'schedule:' says so). 0: just --epochs.",
    )
    max_steps: int = _f(
        0,
        "Stop after this many optimiser steps, whatever --epochs and --min-steps say (the learning-rate "
        "schedule and evaluations are planned over them): for data where one epoch is too long. 0: no cap.",
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


@dataclass(frozen=True)
class FieldType:
    """What one option holds, from its resolved annotation: ``base`` (bool, int, float or str; the first
    of a union such as train_size's ``str | int``), a list of them, and whether None is allowed."""

    base: type
    is_list: bool
    optional: bool


@functools.cache
def field_types() -> dict[str, FieldType]:
    """Each TrainConfig field's type, read from its annotation once (the CLI's flag types and the
    validation's coercion both come from here)."""
    found = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        base = next(a for a in args if a is not type(None))
        is_list = typing.get_origin(base) is list
        found[name] = FieldType(typing.get_args(base)[0] if is_list else base, is_list, type(None) in args)
    return found


# The sliding-window options, at the values that mean "no windows" (also what models saved before them read as).
WINDOW_DEFAULTS: dict[str, Any] = {"stride": None, "window_pool": "mean", "max_windows": 0}
