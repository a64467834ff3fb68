"""What `adaptext tune` searches: the default space per method, space files (``--space``), and the
training config of one trial. Everything here is checked before any trial runs, so a bad space is one
line, not a failed study."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from adaptext import config, options
from adaptext.errors import AdaptextError

# What the rank- and dropout-shaped options mean per method (see models._peft_config).
R_METHODS = ("lora", "dora", "rslora", "adalora", "loha", "lokr")
DROPOUT_METHODS = ("lora", "dora", "rslora", "adalora", "vera")
# Options a space file may search, and the methods each applies to (None: every method).
# alpha_per_r is not an option: it sets lora_alpha = alpha_per_r x lora_r, so alpha follows the rank.
SEARCHABLE: dict[str, tuple[str, ...] | None] = {
    "lr": None, "epochs": None, "batch_size": None, "grad_accum": None, "weight_decay": None,
    "warmup_ratio": None, "warmup_steps": None, "scheduler": None, "max_grad_norm": None, "loss": None,
    "focal_gamma": None, "class_weights": None, "max_length": None,
    "lora_r": R_METHODS, "lora_alpha": R_METHODS, "alpha_per_r": R_METHODS, "lora_dropout": DROPOUT_METHODS,
    "use_dora": ("lora", "rslora"), "use_rslora": ("lora", "dora"), "top_layers": config.TOP_LAYER_METHODS,
    "vera_r": ("vera",), "virtual_tokens": ("prompt", "prefix", "ptuning"), "target_modules": R_METHODS + ("ia3", "vera"),
}  # fmt: skip
RANGE_KEYS = ("type", "low", "high", "log", "step")
CATEGORICAL_KEYS = ("type", "choices")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched option: a float or int range (optionally log-scaled or stepped), or a list of choices."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any, name: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values that bound what this dimension can give (every choice, or both ends)."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        return out if self.step is None else {**out, "step": self.step}


def top_layer_choices(depth: int) -> list[int]:
    """0 (every layer) and a few top-K spans that fit the model: 1, 2, a third, half, two thirds."""
    return [0] + sorted({k for k in (1, 2, depth // 3, depth // 2, 2 * depth // 3) if 0 < k < depth})


def default_space(base: config.TrainConfig, depth: int, fixed: frozenset[str]) -> dict[str, Dimension]:
    """What is searched unless a space file says otherwise: only what applies to the method, and
    nothing the command line fixed. The learning rate spans x0.2..x5 around the method's default
    (or the preset's / config file's value)."""
    lr = base.resolved_lr()
    space = {"lr": Dimension("float", low=lr * 0.2, high=min(lr * 5, 0.5), log=True)}
    if base.method in R_METHODS:
        space["lora_r"] = Dimension("categorical", choices=(4, 8, 16, 32))
        space["alpha_per_r"] = Dimension("categorical", choices=(1, 2, 4))
    if base.method in DROPOUT_METHODS:
        space["lora_dropout"] = Dimension("float", low=0.0, high=0.3)
    if base.method in config.TOP_LAYER_METHODS and not base.layers and len(top_layer_choices(depth)) > 1:
        space["top_layers"] = Dimension("categorical", choices=tuple(top_layer_choices(depth)))
    if "lora_alpha" in fixed:
        space.pop("alpha_per_r", None)
    return {name: dim for name, dim in space.items() if name not in fixed}


def read_space_file(path: str) -> dict[str, Dimension | None]:
    """A YAML mapping ``option: {type: float|int|categorical, low, high, log, step, choices}``;
    ``option: null`` drops a default dimension (the option keeps its fixed value)."""
    where = f"space file {path!r}"
    if not Path(path).is_file():
        raise AdaptextError(f"{where} not found; check the path given to --space")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AdaptextError(f"{where} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AdaptextError(
            f"{where} must hold a mapping of option: {{type: float, low: 0.0001, high: 0.01, log: true}}"
        )
    return {
        str(name).replace("-", "_"): _dimension(where, str(name).replace("-", "_"), spec) for name, spec in raw.items()
    }


def _dimension(where: str, name: str, spec: Any) -> Dimension | None:
    if name not in SEARCHABLE:
        hint = difflib.get_close_matches(name, SEARCHABLE, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "searchable: " + ", ".join(SEARCHABLE)
        raise AdaptextError(f"{where}: unknown option {name!r}; {fix}")
    if spec is None:
        return None
    where = f"{where}: {name}"
    if not isinstance(spec, dict):
        raise AdaptextError(f"{where} must be a mapping such as {{type: float, low: 0.0001, high: 0.01, log: true}}")
    kind = spec.get("type")
    if kind not in ("float", "int", "categorical"):
        raise AdaptextError(f"{where}: type must be float, int or categorical (got {kind!r})")
    allowed = CATEGORICAL_KEYS if kind == "categorical" else RANGE_KEYS
    unknown = [str(k) for k in spec if k not in allowed]
    if unknown:
        raise AdaptextError(f"{where}: unknown key {unknown[0]!r}; a {kind} dimension takes {', '.join(allowed)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise AdaptextError(f"{where}: choices must be a non-empty list, e.g. choices: [4, 8, 16]")
        if any(c is not None and not isinstance(c, (str, int, float, bool)) for c in choices):
            raise AdaptextError(f"{where}: each choice must be a single value (a number, word, true/false or null)")
        if len({json.dumps(c) for c in choices}) < len(choices):
            raise AdaptextError(f"{where}: choices repeat; list each value once")
        return Dimension("categorical", choices=tuple(choices))
    numbers = {k: spec.get(k) for k in ("low", "high", "step") if spec.get(k) is not None}
    for key, value in numbers.items():
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or (kind == "int" and not float(value).is_integer()):
            raise AdaptextError(f"{where}: {key} must be {'a whole' if kind == 'int' else 'a'} number (got {value!r})")
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    if low is None or high is None or not low < high:
        raise AdaptextError(f"{where}: give low and high with low < high (got low {low!r}, high {high!r})")
    if not isinstance(log, bool):
        raise AdaptextError(f"{where}: log must be true or false (got {log!r})")
    if log and low <= 0:
        raise AdaptextError(f"{where}: a log scale needs low > 0 (got {low!r})")
    if step is not None and (step <= 0 or log):
        raise AdaptextError(f"{where}: step must be > 0 and cannot be combined with log: true")
    cast = int if kind == "int" else float
    return Dimension(kind, low=cast(low), high=cast(high), log=log, step=None if step is None else cast(step))


def build_space(
    base: config.TrainConfig, fixed: frozenset[str], space_file: str | None, depth: int
) -> dict[str, Dimension]:
    """The default space merged with the space file, every dimension checked against the method and model."""
    space = default_space(base, depth, fixed)
    overrides = read_space_file(space_file) if space_file else {}
    where = f"space file {space_file!r}" if space_file else "search space"
    for name, dim in overrides.items():
        if dim is None:
            space.pop(name, None)
            continue
        if name in fixed or (name == "alpha_per_r" and "lora_alpha" in fixed):
            flag = "--" + ("lora_alpha" if name == "alpha_per_r" else name).replace("_", "-")
            raise AdaptextError(f"{where}: {name} is also fixed on the command line ({flag}); drop one of them")
        methods = SEARCHABLE[name]
        if methods is not None and base.method not in methods:
            raise AdaptextError(
                f"{where}: {name} does not apply to --method {base.method} (only to {', '.join(methods)}); "
                "remove it from the file"
            )
        space[name] = dim
    if "lora_alpha" in overrides and overrides["lora_alpha"] is not None:
        if "alpha_per_r" in overrides and overrides["alpha_per_r"] is not None:
            raise AdaptextError(f"{where}: lora_alpha and alpha_per_r both set lora_alpha; keep one of them")
        space.pop("alpha_per_r", None)
    if "top_layers" in space and base.layers:
        raise AdaptextError(f"{where}: top_layers and the fixed --layers both choose layers; drop one of them")
    for name, dim in space.items():
        for value in dim.extremes():
            if name == "top_layers" and value is not None and isinstance(value, (int, float)) and value > depth:
                raise AdaptextError(f"{where}: top_layers {value} is more than the model's {depth} layers")
            if name == "alpha_per_r":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise AdaptextError(f"{where}: alpha_per_r values must be numbers > 0 (got {value!r})")
                continue
            try:
                trial_options(base, {name: value}, Path("."))
            except AdaptextError as exc:
                raise AdaptextError(f"{where}: {name} {value!r}: {exc}") from None
    return space


def option_value(name: str, value: Any) -> Any:
    if name == "top_layers" and value == 0:
        return None  # 0 = every layer, written as the default
    if name == "target_modules" and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def trial_options(base: config.TrainConfig, params: dict[str, Any], folder: Path) -> config.TrainConfig:
    """One trial's full training config: the shared options with the sampled values in place."""
    values = base.to_dict()
    values.update({name: option_value(name, v) for name, v in params.items() if name != "alpha_per_r"})
    if "alpha_per_r" in params:
        values["lora_alpha"] = max(1, round(values["lora_r"] * params["alpha_per_r"]))
    values.update(output=str(folder), overwrite=True, resume=False)
    return options.validate(options.from_dict(values, source="search space"))


def describe(dim: Dimension) -> str:
    if dim.type == "categorical":
        return "{" + ",".join(show(c) for c in dim.choices) + "}"
    return f"[{show(dim.low)}, {show(dim.high)}]" + (" log" if dim.log else "")


def show(value: Any) -> str:
    """A searched value as tables and trial labels print it."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
