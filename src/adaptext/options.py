"""Run options from every edge (the CLI, the Python API, YAML files, a saved model's adaptext.json) into
one TrainConfig, checked once: a bad value fails here with a one-line error naming the option and the fix,
so later stages trust the config. Saved configs of older models are migrated on read (``saved_config``)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from typing import Any

from adaptext.config import (
    FEATURE_CACHE,
    HEAD_INITS,
    HEAD_REFITS,
    LONG_TEXT,
    LOSSES,
    MAX_FOCAL_GAMMA,
    METHODS,
    METRICS,
    POOLINGS,
    PRECISIONS,
    REPORT_TO,
    SCHEDULERS,
    SHARDING,
    TASKS,
    TOKEN_CACHE,
    TOP_LAYER_METHODS,
    WINDOW_DEFAULTS,
    WINDOW_POOLS,
    FieldType,
    TrainConfig,
    field_types,
)  # fmt: skip
from adaptext.errors import AdaptextError


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AdaptextError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(choices)}")


def _coerce(name: str, kind: FieldType, value: Any) -> Any:
    """One value as its field's type. YAML hands over strings for numbers it does not recognise (PyYAML
    reads ``2e-3`` as a string: it wants ``2.0e-3``) and the Python API takes anything."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        if kind.optional:
            return None
        raise AdaptextError(f"{flag} needs a value (got none)")
    if kind.is_list:
        values = value if isinstance(value, (list, tuple)) else [value]
        item = dataclasses.replace(kind, is_list=False, optional=False)
        return [_coerce(name, item, v) for v in values]
    if kind.base is bool:
        if isinstance(value, bool):
            return value
        raise AdaptextError(f"{flag} must be true or false (got {value!r})")
    if kind.base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise AdaptextError(f"{flag} must be a single value (got {value!r})")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AdaptextError(f"{flag} must be a number (got {value!r})")
    try:
        converted = float(value)
    except (ValueError, OverflowError):
        raise AdaptextError(f"{flag} must be a number (got {value!r})") from None
    if not math.isfinite(converted):
        raise AdaptextError(f"{flag} must be a finite number (got {value!r})")
    if kind.base is int:
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
    return _coerce("train_size", FieldType(int, is_list=False, optional=True), value)


def per_class(train_size: int | str | None) -> int | None:
    """N of an "N/class" train size, else None."""
    return int(train_size[: -len(PER_CLASS)]) if isinstance(train_size, str) else None


# Each option with a fixed set of values, and that set.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "precision": PRECISIONS, "pooling": POOLINGS, "head_init": HEAD_INITS,
    "head_refit": HEAD_REFITS, "scheduler": SCHEDULERS, "long_text": LONG_TEXT, "window_pool": WINDOW_POOLS,
    "metric": METRICS, "task": TASKS, "loss": LOSSES, "feature_cache": FEATURE_CACHE, "token_cache": TOKEN_CACHE,
    "shard": SHARDING,
}  # fmt: skip
POSITIVE = ("batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha", "log_every", "evals_per_epoch",
            "vera_r", "virtual_tokens")  # fmt: skip
NOT_NEGATIVE = (
    "min_steps",
    "max_steps",
    "small_data_epochs",
    "validation_min_train",
    "warmup_steps",
    "checkpoint_steps",
)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field once, at the edge, so later stages can trust the config."""
    for f in dataclasses.fields(cfg):
        if f.name == "train_size":
            cfg.train_size = parse_train_size(cfg.train_size)
            continue
        setattr(cfg, f.name, _coerce(f.name, field_types()[f.name], getattr(cfg, f.name)))
    for name, choices in CHOICES.items():
        _check_choice(name, getattr(cfg, name), choices)
    _check_task(cfg)
    _check_loss(cfg)
    _check_report_to(cfg)
    _check_layers(cfg)
    _check_numbers(cfg)
    _check_windows(cfg)
    if cfg.resume and not cfg.output:
        raise AdaptextError("--resume needs --output DIR: the directory of the interrupted run")
    if cfg.resume and cfg.overwrite:
        raise AdaptextError("--resume continues a run and --overwrite starts it over; pass one of them")
    if cfg.resume and cfg.method == "adalora":
        raise AdaptextError("--resume does not support adalora (its rank allocator is not checkpointed); rerun it")
    return cfg


def _check_loss(cfg: TrainConfig) -> None:
    if cfg.loss == "contrastive" and cfg.head_refit == "off":
        raise AdaptextError("--loss contrastive trains no head (it is refitted after training): drop --head-refit off")
    if cfg.loss == "contrastive" and cfg.contrastive == 0:
        raise AdaptextError("--loss contrastive with --contrastive 0 has nothing to learn from: drop one of them")
    if cfg.contrastive is not None and cfg.contrastive < 0:
        raise AdaptextError(f"--contrastive must be >= 0 (got {cfg.contrastive}); 0 turns it off")
    if cfg.contrastive_temperature <= 0:
        raise AdaptextError(f"--contrastive-temperature must be > 0 (got {cfg.contrastive_temperature})")
    if not 0 <= cfg.focal_gamma <= MAX_FOCAL_GAMMA:
        raise AdaptextError(
            f"--focal-gamma must be between 0 and {MAX_FOCAL_GAMMA:g} (got {cfg.focal_gamma}); 2 is the usual choice"
        )


def _check_layers(cfg: TrainConfig) -> None:
    if not cfg.top_layers:
        return
    if cfg.top_layers < 0:
        raise AdaptextError(f"--top-layers must be >= 0 (got {cfg.top_layers}); 0 adapts every layer")
    if cfg.layers:
        raise AdaptextError("--top-layers and --layers both choose layers; pass only one of them")
    if cfg.method not in TOP_LAYER_METHODS:
        raise AdaptextError(
            f"--top-layers does not apply to --method {cfg.method}; use it with {', '.join(TOP_LAYER_METHODS)}"
        )


def _check_numbers(cfg: TrainConfig) -> None:
    """Counts, sizes, seeds and rates in their ranges."""
    if cfg.epochs is None or cfg.epochs < 0:
        raise AdaptextError(f"--epochs must be >= 0 (got {cfg.epochs}); 0 evaluates the untrained model")
    for name in NOT_NEGATIVE:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise AdaptextError(f"{_flag(name)} must be >= 0 (got {getattr(cfg, name)})")
    for name in POSITIVE:
        if getattr(cfg, name) is None or getattr(cfg, name) <= 0:
            raise AdaptextError(f"{_flag(name)} must be > 0 (got {getattr(cfg, name)})")
    sizes = ("eval_size", "test_size") if isinstance(cfg.train_size, str) else ("train_size", "eval_size", "test_size")
    for name in sizes:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 2:
            raise AdaptextError(f"{_flag(name)} must be at least 2 (got {getattr(cfg, name)})")
    for name in ("seed", "data_seed"):  # numpy's and sklearn's seeds are 32-bit unsigned
        value = getattr(cfg, name)
        if value is not None and not 0 <= value < 2**32:
            raise AdaptextError(f"{_flag(name)} must be between 0 and {2**32 - 1} (got {value})")
    if cfg.lr is not None and not 0 < cfg.lr < 1:
        raise AdaptextError(f"--lr must be between 0 and 1 (got {cfg.lr})")
    if not 0 < cfg.validation_fraction < 1:
        raise AdaptextError("--validation-fraction must be between 0 and 1")
    if not 0 <= cfg.warmup_ratio < 1:
        raise AdaptextError("--warmup-ratio must be in [0, 1)")
    if not 0 <= cfg.lora_dropout < 1:
        raise AdaptextError("--lora-dropout must be in [0, 1)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        if field_types()[f.name].is_list and value is not None and not isinstance(value, list):
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
