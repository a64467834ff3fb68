"""Live training logs for ``--report-to tensorboard,mlflow``, written while the model trains.

Writers are fed every training-log record (loss, lr, samples/s, tokens/s; every ``--log-every`` steps),
every validation record (each numeric figure, whatever the task) and, at the end, the saved model's
validation, test and training figures (``final/...``). They write into OUTPUT itself, where the
checkpoint also lives while a run trains, not into the staging folder the finished model is assembled
in (adaptext.artifacts.staged_dir): a run that crashes keeps what it logged. A finished run moves them
into that folder just before it replaces OUTPUT, so they end at the same paths:

    OUTPUT/runs/<start time>/   TensorBoard events, one folder per attempt (a resumed run adds one)
    OUTPUT/mlflow.db            MLflow's SQLite store, unless MLFLOW_TRACKING_URI names another
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptext.errors import AdaptextError

RUNS = "runs"
MLFLOW_DB = "mlflow.db"
EXPERIMENT = "adaptext"  # unless MLFLOW_EXPERIMENT_NAME says otherwise


def scalars(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric figures of a record as ``prefix/key`` (the step is the x axis, not a figure)."""
    return {
        f"{prefix}/{key}": float(value)
        for key, value in record.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and key != "step"
    }


class _TensorBoard:
    def __init__(self, output: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.folder, n = output / RUNS / stamp, 1
        while self.folder.exists():  # a resumed attempt in the same second: a folder of its own all the same
            n += 1
            self.folder = output / RUNS / f"{stamp}-{n}"
        self.writer = SummaryWriter(str(self.folder))
        self.where = f"tensorboard {self.folder}"

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash keeps every record written so far

    def close(self, status: str) -> None:
        self.writer.close()

    def keep(self, output: Path, staging: Path, resumed: bool) -> None:
        # A resumed run keeps its earlier attempts' folders; a fresh one (--overwrite) only its own.
        source = output / RUNS if resumed else self.folder
        _move(source, staging / source.relative_to(output))


class _MLflow:
    def __init__(self, output: Path, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        # MLflow 3 refuses its old file store (./mlruns) unless MLFLOW_ALLOW_FILE_STORE is set: SQLite it is.
        self.local = None if os.environ.get("MLFLOW_TRACKING_URI") else output.resolve() / MLFLOW_DB
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.local}"
        if self.local is not None:
            output.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        # Nothing is logged as an artifact; a local store still gets a location of its own, not ./mlruns.
        artifacts = (output.resolve() / "mlartifacts").as_uri() if self.local else None
        experiment = found.experiment_id if found else self.client.create_experiment(name, artifacts)
        self.run_id = self.client.create_run(experiment, run_name=output.name).info.run_id
        self.where = f"mlflow run {self.run_id} in experiment {name!r} at {uri}"
        params = [
            Param(key[:MAX_ENTITY_KEY_LENGTH], str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in _flat(config).items()
        ]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def keep(self, output: Path, staging: Path, resumed: bool) -> None:
        if self.local is not None:  # the same path once staging replaces OUTPUT: the store's paths hold
            _move(self.local, staging / MLFLOW_DB)


class Reporter:
    """The writers of one run (none: every call does nothing). A context manager: leaving it on an
    exception ends the runs as failed (killed on Ctrl-C); :meth:`finish` ends them as finished."""

    def __init__(
        self,
        names: list[str] | None,
        output: Path,
        config: dict[str, Any],
        echo: Callable[[str], None] = print,
        resumed: bool = False,
    ) -> None:
        self.output, self.echo, self.resumed = output, echo, resumed
        self.writers: dict[str, Any] = {}
        fresh = not output.exists()
        for name in names or []:
            try:
                self.writers[name] = _TensorBoard(output) if name == "tensorboard" else _MLflow(output, config)
            except Exception as exc:
                self._close("FAILED")
                if fresh:  # nothing was trained: leave no folder behind
                    shutil.rmtree(output, ignore_errors=True)
                raise AdaptextError(
                    f"--report-to {name} could not start ({cause(exc)}); fix it or drop {name}"
                ) from None
        self.opened = list(self.writers.values())  # one that stops logging still keeps what it wrote
        for writer in self.opened:
            echo(f"report: {writer.where}")

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if kind is not None:
            self._close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def log_step(self, record: dict[str, Any]) -> None:
        self._log(scalars(record, "train"), record["step"])

    def with_eval(self, on_eval: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
        """A validation hook that logs the record, then calls ``on_eval`` (whose exceptions propagate)."""

        def hook(record: dict[str, Any]) -> None:
            self._log(scalars(record, "validation"), record["step"])
            if on_eval is not None:
                on_eval(record)

        return hook

    def finish(self, metrics: dict[str, Any], step: int, staging: Path) -> None:
        """Log the saved model's figures, end the runs and move their files into ``staging``."""
        for split in ("validation", "test", "train"):
            if isinstance(metrics.get(split), dict):
                self._log(scalars(metrics[split], f"final/{split}"), step)
        self._close("FINISHED")
        for writer in self.opened:
            writer.keep(self.output, staging, self.resumed)

    def _log(self, values: dict[str, float], step: int) -> None:
        for name, writer in list(self.writers.items()):
            try:
                writer.log(values, step)
            except Exception as exc:  # a logging service that fails must not cost the training
                self.echo(f"warning: --report-to {name} stopped logging ({cause(exc)}); training goes on")
                del self.writers[name]
                with contextlib.suppress(Exception):
                    writer.close("FAILED")

    def _close(self, status: str) -> None:
        writers, self.writers = self.writers, {}
        for name, writer in writers.items():
            try:
                writer.close(status)
            except Exception as exc:
                self.echo(f"warning: --report-to {name} could not end its run ({cause(exc)})")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def _move(source: Path, target: Path) -> None:
    if source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)


def cause(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line warnings and errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
