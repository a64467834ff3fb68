"""`adaptext compare`: one study over training methods on identical data, resumable, with a report.

Every (method, seed) run is an ordinary ``adaptext train`` in its own process, written to
``OUTPUT/runs/<method>-seed<N>``: peak memory is measured per run, a crash in one arm does not take
the study down, and a run's directory only appears once it is complete (staged and renamed), so a
re-run of the same command skips every run whose directory holds the same configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from adaptext import artifacts, config, options
from adaptext.artifacts import HEAD_FILE, META_FILE, write_json
from adaptext.errors import AdaptextError

# zero: the base model with its untrained head, scored as is; setfit: the SetFit library (adaptext.setfit_arm)
ARMS = ("zero",) + config.METHODS + ("setfit",)
DEFAULT_METHODS = ["zero", "head", "lora", "ia3", "full"]
MARKER = "compare.json"
WEIGHT_FILES = (
    "adapter_model.safetensors", HEAD_FILE, "model.safetensors", "setfit/model.safetensors", "setfit/model_head.pkl",
)  # fmt: skip
IGNORED_KEYS = ("output", "overwrite")  # where a run is written does not change what it computes


@dataclasses.dataclass
class Study:
    base: config.TrainConfig
    methods: list[str]
    seeds: int = 1
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    output: Path = Path("compare")
    # A learning curve: every arm at every size (N or "N/class"); each seed then draws its own split
    # (data seed = seed), the same split for every arm.
    train_sizes: list[int | str] | None = None


def parse_sizes(raw: list[str] | None) -> list[int | str] | None:
    """--train-sizes 8/class,64/class,500 -> ['8/class', '64/class', 500] (each checked as --train-size)."""
    if not raw:
        return None
    sizes = [options.parse_train_size(item) for item in raw]
    for size in sizes:
        if size is None or (isinstance(size, int) and size < 2):
            raise AdaptextError(f"--train-sizes: {size!r} is too small; give N >= 2 or N/class")
    if len(set(map(str, sizes))) != len(sizes):
        raise AdaptextError("--train-sizes: a size is given twice")
    return sizes


def size_tag(size: int | str | None) -> str:
    return "all" if size is None else str(size).replace("/class", "-per-class")


def parse_overrides(items: list[str] | None, nested: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` strings (values parsed as YAML) merged over a ``{method: {key: value}}`` map."""
    out: dict[str, dict[str, Any]] = {m: dict(v or {}) for m, v in (nested or {}).items()}
    for item in items or []:
        head, sep, raw = item.partition("=")
        method, dot, key = head.partition(".")
        if not sep or not dot or not key:
            raise AdaptextError(f"--set {item!r}: write METHOD.OPTION=VALUE, e.g. --set ia3.lr=0.01")
        out.setdefault(method.strip(), {})[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    for method in out:
        if method not in ARMS:
            raise AdaptextError(f"--set {method}: unknown method; choose from {', '.join(ARMS)}")
    return out


def arm_config(study: Study, method: str, seed_index: int, size: int | str | None = None) -> config.TrainConfig:
    """The full training config of one run: base options, the method's own overrides, its seed (and, in a
    learning curve, its training size, with the data split drawn by its seed)."""
    values = study.base.to_dict()
    values.update(study.overrides.get(method, {}))
    if method == "zero":
        values.update(method="head", epochs=0)
    elif method == "setfit":
        values["method"] = "full"  # nominal: SetFit fine-tunes the whole body; its recipe is the library's
    else:
        values["method"] = method
    values["data_seed"] = study.base.data_seed if study.base.data_seed is not None else study.base.seed
    values["seed"] = study.base.seed + seed_index
    if study.train_sizes is not None:
        values["train_size"] = size
        values["data_seed"] = values["seed"]
    values["output"] = str(run_dir(study.output, method, values["seed"], size if study.train_sizes else None))
    values["overwrite"] = True
    return options.validate(options.from_dict(values, source=f"--set {method}"))


def run_dir(output: Path, method: str, seed: int, size: int | str | None = None) -> Path:
    runs = output / "runs" if size is None else output / "runs" / size_tag(size)
    return runs / f"{method}-seed{seed}"


def _comparable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in IGNORED_KEYS}))


def finished(cfg: config.TrainConfig) -> bool:
    """A run is done when its directory exists (it is renamed into place last) with this very config."""
    meta_path = Path(cfg.output) / META_FILE
    if not meta_path.is_file() or not (Path(cfg.output) / "metrics.json").is_file():
        return False
    try:
        saved = json.loads(meta_path.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        return False
    # An option added since that run was made did not exist then: the run had its default
    # (runs saved before the window options ran without windows).
    return _comparable({**config.TrainConfig().to_dict(), **config.WINDOW_DEFAULTS, **saved}) == _comparable(
        cfg.to_dict()
    )


def check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise AdaptextError(f"output {str(output)!r} is a file; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise AdaptextError(
            f"output directory {str(output)!r} exists and is not an adaptext compare directory; choose another --output"
        )
    artifacts.check_parents(output)  # missing parent folders are made (as for adaptext train)


def run_study(study: Study, echo: Callable[[str], None] = print, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) every arm, then write results.json, report.md/html and the plots."""
    # lazy: matplotlib loads only when a study writes its report
    from adaptext import report

    for method in study.methods:
        if method not in ARMS:
            raise AdaptextError(f"--methods: unknown method {method!r}; choose from {', '.join(ARMS)}")
    if study.seeds < 1:
        raise AdaptextError(f"--seeds must be >= 1 (got {study.seeds})")
    sizes = study.train_sizes or [None]
    plan = [(m, i, arm_config(study, m, i, size)) for size in sizes for m in study.methods for i in range(study.seeds)]
    check_output(study.output)
    _check_inputs(plan[0][2])
    if "setfit" in study.methods:
        # lazy: the optional setfit arm, only when asked for
        from adaptext.setfit_arm import require

        require()
    study.output.mkdir(parents=True, exist_ok=True)
    (study.output / "runs").mkdir(exist_ok=True)
    (study.output / "logs").mkdir(exist_ok=True)
    write_json(
        study.output / MARKER,
        {
            "methods": study.methods,
            "seeds": study.seeds,
            "train_sizes": study.train_sizes,
            "base": study.base.to_dict(),
        },
    )
    for leftover in (study.output / "runs").glob("**/.*"):  # staging dirs and configs of runs killed midway
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    failures: dict[tuple[str, int], str] = {}
    for number, (method, _, cfg) in enumerate(plan, 1):
        at = f" at {cfg.train_size}" if study.train_sizes else ""
        label = f"[{number}/{len(plan)}] {method}{at} seed {cfg.seed}"
        if finished(cfg):
            echo(f"{label}: done already, skipped ({cfg.output})")
            continue
        started = time.perf_counter()
        log_name = (
            f"{Path(cfg.output).name}.log"
            if not study.train_sizes
            else f"{size_tag(cfg.train_size)}-{Path(cfg.output).name}.log"
        )
        error = _run_one(cfg, study.output / "logs" / log_name, progress, method)
        if error:
            failures[(method, cfg.seed, str(cfg.train_size))] = error
            echo(f"{label}: FAILED: {error}")
            continue
        test = _final_metrics(Path(cfg.output))
        echo(
            f"{label}: accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  ({time.perf_counter() - started:.0f} s)"
        )

    arms = [
        _aggregate(study, m, [c for mm, _, c in plan if mm == m and c.train_size == (size or c.train_size)], failures)
        for size in sizes
        for m in study.methods
    ]
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "methods": study.methods,
        "seeds": study.seeds,
        "train_sizes": study.train_sizes,
        "overrides": study.overrides,
        "config": study.base.to_dict(),
        "run_configs": {Path(c.output).name: c.to_dict() for _, _, c in plan},
        "versions": artifacts.library_versions(),
        "arms": arms,
    }
    write_json(study.output / "results.json", results)
    report.write_all(study.output, results)
    echo(f"report: {study.output / 'report.html'}")
    if failures:
        names = ", ".join(f"{m} (seed {s}{'' if not study.train_sizes else ', ' + z})" for m, s, z in failures)
        raise AdaptextError(f"{len(failures)} run(s) failed: {names}; see {study.output / 'logs'} and report.md")
    return results


def _check_inputs(cfg: config.TrainConfig) -> None:
    """Load the data and resolve the model once up front: a bad input fails before any run starts."""
    # lazy: torch and transformers load when a study runs, not when the CLI parses
    from adaptext import data, models

    models.quiet_transformers()
    models.resolve_model(cfg.model)
    dataset = data.load_training_data(cfg)
    if dataset.task != "single-label":
        raise AdaptextError(
            f"adaptext compare reports accuracy and confusion matrices of single-label data; this is {dataset.task} "
            "data: train each method with adaptext train (its metrics.json has the task's metrics)"
        )


def _run_one(cfg: config.TrainConfig, log_path: Path, progress: bool, method: str = "") -> str | None:
    """Train one run in a child process; return the error line on failure."""
    run_config = Path(cfg.output).parent / f".{Path(cfg.output).name}.yaml"
    run_config.parent.mkdir(parents=True, exist_ok=True)
    run_config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    if method == "setfit":
        command = [sys.executable, "-m", "adaptext.setfit_arm", str(run_config)]
    else:
        command = [sys.executable, "-m", "adaptext", "train", "--config", str(run_config)]
        if not progress:
            command.append("--quiet")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with log_path.open("w", encoding="utf-8") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    finally:
        run_config.unlink(missing_ok=True)
    if code == 0:
        return None
    lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [f"exit code {code}"])[-1].removeprefix("error: ")[:300]


def _final_metrics(folder: Path) -> dict[str, Any]:
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return metrics.get("test") or metrics["validation"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _aggregate(
    study: Study, method: str, cfgs: list[config.TrainConfig], failures: dict[tuple[str, int], str]
) -> dict[str, Any]:
    """One arm's figures over its seeds: mean and sample std of each metric, costs, curve."""
    arm: dict[str, Any] = {"method": method, "seeds": [c.seed for c in cfgs], "dirs": [c.output for c in cfgs]}
    if study.train_sizes:
        arm["train_size"] = cfgs[0].train_size
    errors = [failures[k] for c in cfgs if (k := (method, c.seed, str(c.train_size))) in failures]
    if errors:
        return {**arm, "status": "failed", "error": errors[0]}
    runs = []
    for cfg in cfgs:
        folder = Path(cfg.output)
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        meta = artifacts.read_meta(folder)
        runs.append((metrics, meta, folder))
    split = "test" if runs[0][0].get("test") else "validation"
    finals = [m[split] for m, _, _ in runs]
    trains = [m["train"] for m, _, _ in runs]
    params = runs[0][1]["params"]
    out = {**arm, "status": "ok", "split": split, "n": finals[0]["n"], "lr": runs[0][1]["lr"]}
    for key in ("accuracy", "macro_f1", "weighted_f1", "loss"):
        out[f"{key}_mean"], out[f"{key}_std"] = _mean_std([f[key] for f in finals])
    out["eval_loss_mean"] = out["loss_mean"]
    out["accuracy_per_seed"] = [f["accuracy"] for f in finals]
    out["per_class_f1"] = {
        name: _mean_std([f["per_class"][name]["f1"] for f in finals])[0] for name in finals[0]["class_names"]
    }
    out["class_names"] = finals[0]["class_names"]
    supports = [finals[0]["per_class"][name]["support"] for name in out["class_names"]]
    # The bar an arm must clear to have learned anything: the majority-class rate (1/k when balanced).
    out["chance_accuracy"] = max(max(supports) / max(sum(supports), 1), 1 / len(supports))
    out["at_or_below_chance"] = out["accuracy_mean"] <= out["chance_accuracy"] + 0.01
    out["confusion_matrix"] = [[sum(f["confusion_matrix"][i][j] for f in finals) for j in range(len(row))]
                               for i, row in enumerate(finals[0]["confusion_matrix"])]  # fmt: skip
    trainable = 0 if method == "zero" else params["trainable"]
    out.update(
        trainable_params=trainable,
        adapter_params=0 if method == "zero" else params["adapter"],
        head_params=0 if method == "zero" else params["head"],
        total_params=params["total"],
        trainable_percent=round(100 * trainable / max(params["total"], 1), 4),
        size_bytes=sum((runs[0][2] / name).stat().st_size for name in WEIGHT_FILES if (runs[0][2] / name).is_file()),
    )
    for key, source in (("train_seconds", "seconds"), ("samples_per_second", "samples_per_second")):
        out[f"{key}_mean"], out[f"{key}_std"] = _mean_std([t[source] for t in trains])
    out["train_rows_mean"] = _mean_std([t.get("rows") or 0 for t in trains])[0]
    out["peak_rss_mb"] = max(t.get("peak_rss_mb") or 0 for t in trains)
    gpu = [t.get("gpu_peak_mb") for t in trains if t.get("gpu_peak_mb") is not None]
    out["gpu_peak_mb"] = max(gpu) if gpu else None
    out["curve"] = _mean_curve([m["history"] for m, _, _ in runs])
    return out


def _mean_curve(histories: list[list[dict[str, Any]]]) -> list[dict[str, float]]:
    """Validation accuracy and loss per evaluation point, averaged over seeds."""
    length = min((len(h) for h in histories), default=0)
    return [
        {
            "epoch": histories[0][i]["epoch"],
            "accuracy": sum(h[i]["accuracy"] for h in histories) / len(histories),
            "loss": sum(h[i]["loss"] for h in histories) / len(histories),
        }
        for i in range(length)
    ]
