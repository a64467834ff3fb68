"""`adaptext tune`: a hyper-parameter search with Optuna, resumable, pruned on validation metrics.

Each trial is an ordinary ``adaptext train`` run, in this process (pruning needs its evaluations as
they happen), written to ``OUTPUT/trials/NNNN``. Every validation record is reported to Optuna
(step = the evaluation's index) and the median pruner stops trials that are worse than the finished
ones at the same point. The objective is the best validation value of ``--metric``; test metrics
are stored beside it but never steer the search.

The study lives in SQLite (``OUTPUT/study.db`` by default), so re-running the same command continues
it up to ``--trials``. One process runs a study at a time (it holds ``OUTPUT/.tune.lock``), so a
trial found RUNNING at the start belongs to a process that died: it is marked failed and its
parameters are tried again, from the checkpoint its training left when there is a usable one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adaptext import artifacts, checkpoint, config
from adaptext.errors import AdaptextError
from adaptext.tasks import Task, lower_is_better
from adaptext.tune_results import MARKER, finish
from adaptext.tune_space import Dimension, build_space, describe, show, trial_options

LOCK = ".tune.lock"
PRUNERS = ("median", "none")


def direction(metric: str) -> str:
    """'minimize' for error-like metrics (loss, mse, rmse, mae), 'maximize' for scores (accuracy, F1...)."""
    return "minimize" if lower_is_better(metric) else "maximize"


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise AdaptextError(
            "adaptext tune needs optuna: pip install 'adaptext[tune]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # adaptext prints one line per trial itself
    return optuna


@dataclasses.dataclass
class Plan:
    """A study: the options every trial shares, what is searched, and where it all goes."""

    base: config.TrainConfig
    output: Path
    trials: int = 20
    timeout: float | None = None
    study_name: str | None = None
    storage: str | None = None
    pruner: str = "median"
    space_file: str | None = None
    sampler_seed: int | None = None
    fixed: frozenset[str] = frozenset()  # options given on the command line: never searched


# --------------------------------------------------------------------------- the study


def trial_dir(output: Path, number: int) -> Path:
    return output / "trials" / f"{number:04d}"


def check_plan(plan: Plan) -> None:
    """Everything that can be refused before any file is written or any data read."""
    base = plan.base
    if not base.output:
        raise AdaptextError("adaptext tune needs --output DIR: the study lives there and re-running it resumes")
    if base.resume:
        raise AdaptextError("adaptext tune resumes by itself: re-run the same command without --resume")
    if base.overwrite:
        raise AdaptextError("adaptext tune does not take --overwrite; remove the output directory to start a new study")
    if base.epochs <= 0:
        raise AdaptextError(f"--epochs {base.epochs}: a trial must train (epochs > 0) to be scored")
    if isinstance(plan.trials, bool) or not isinstance(plan.trials, int) or plan.trials < 1:
        raise AdaptextError(f"--trials must be at least 1 (got {plan.trials})")
    if plan.timeout is not None and not plan.timeout > 0:
        raise AdaptextError(f"--timeout must be > 0 seconds (got {plan.timeout})")
    if plan.pruner not in PRUNERS:
        raise AdaptextError(f"--pruner {plan.pruner!r} is not one of {', '.join(PRUNERS)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise AdaptextError("adaptext tune runs its trials in one process; start it without torchrun")
    if plan.storage is not None:
        storage_url(plan)
    output = plan.output
    if output.exists() and not output.is_dir():
        raise AdaptextError(f"output {str(output)!r} is a file; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise AdaptextError(
            f"output directory {str(output)!r} exists and is not an adaptext tune directory; choose another --output"
        )
    artifacts.check_parents(output)  # missing parent folders are made (as for adaptext train)


def storage_url(plan: Plan) -> str:
    """--storage as given (any SQLAlchemy URL Optuna accepts), or SQLite in the output directory."""
    if plan.storage is None:
        return f"sqlite:///{(plan.output / 'study.db').resolve()}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    fix = "use sqlite:///path/to/study.db (or another SQLAlchemy database URL)"
    try:
        url = make_url(plan.storage)
    except (ArgumentError, ValueError):
        raise AdaptextError(f"--storage {plan.storage!r} is not a database URL; {fix}") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).expanduser().resolve().parent
        if not folder.is_dir() and folder != plan.output.resolve():
            raise AdaptextError(f"--storage {plan.storage!r}: folder {str(folder)!r} does not exist; {fix}")
    return plan.storage


def _identity(plan: Plan, name: str) -> dict[str, Any]:
    """What makes trials comparable: every training option that changes a result, and where the study is."""
    options = {k: v for k, v in plan.base.to_dict().items() if k not in checkpoint.FREE_OPTIONS}
    return json.loads(json.dumps({"options": options, "study_name": name, "storage": plan.storage}))


@contextlib.contextmanager
def _locked(output: Path) -> Iterator[None]:
    """One process per study: the lock dies with its process, so a killed run never blocks the next."""
    import fcntl

    with (output / LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise AdaptextError(
                f"another adaptext tune is running the study in {output}; wait for it, then re-run"
            ) from None
        yield


def run_study(plan: Plan, echo: Callable[[str], None] = print, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) the study up to ``plan.trials`` finished trials; write trials.csv, best.yaml, best."""
    optuna = require_optuna()
    check_plan(plan)
    depth, task = _check_inputs(plan.base)
    # --metric auto means the task's usual metric (loss, micro_f1, rmse): the study needs its name.
    plan.base.metric = Task(task).resolve_metric(plan.base.metric)
    space = build_space(plan.base, plan.fixed, plan.space_file, depth)
    url = storage_url(plan)
    metric, goal = plan.base.metric, direction(plan.base.metric)
    marker = plan.output / MARKER
    saved = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    # The default name is the output's at the study's start: a study moved to another folder keeps it.
    name = plan.study_name or (saved or {}).get("study_name") or plan.output.resolve().name
    identity = _identity(plan, name)
    searched = {option: dim.to_dict() for option, dim in space.items()}
    if saved is not None:
        _check_same_study(plan.output, saved, identity, searched)
    (plan.output / "trials").mkdir(parents=True, exist_ok=True)
    (plan.output / "logs").mkdir(exist_ok=True)
    with _locked(plan.output):
        try:
            study = optuna.create_study(
                storage=url, study_name=name, direction=goal, load_if_exists=True, pruner=_pruner(plan)
            )
        except Exception as exc:  # noqa: BLE001 — a driver, a path, a locked or foreign database: one line
            raise AdaptextError(f"--storage {url!r}: cannot open the study ({_first_line(exc)})") from None
        if study.direction.name.lower() != goal:
            raise AdaptextError(
                f"study {name!r} in {url} is set to {study.direction.name.lower()}, but --metric {metric} needs "
                f"{goal}; pass another --study-name"
            )
        results = {"results": saved["results"]} if saved and "results" in saved else {}
        artifacts.write_json(marker, {"identity": identity, "space": searched, "study_name": name, "metric": metric,
                             "direction": goal, "storage": url, **results})  # fmt: skip
        _recover(optuna, study, plan.output, echo)
        # Seeded by how many trials the study has: a resumed run must not replay the first run's samples.
        seed = plan.sampler_seed if plan.sampler_seed is not None else plan.base.seed
        study.sampler = optuna.samplers.TPESampler(seed=(seed + len(study.trials)) % 2**32)
        _search(optuna, study, plan, space, echo, progress)
        return finish(optuna, study, plan.output, plan.base.metric, plan.trials, echo)


def _check_inputs(base: config.TrainConfig) -> tuple[int, str]:
    """Resolve the model and load the data once up front (a bad input fails before any trial): the model's
    depth and the data's task."""
    from transformers import AutoConfig

    # lazy: torch and transformers load when a study runs, not when the CLI parses
    from adaptext import data, models

    models.quiet_transformers()
    source = models.resolve_model(base.model)
    try:
        model_config = AutoConfig.from_pretrained(source.path)
    except Exception as exc:  # noqa: BLE001 — the same one line as a failed training load
        raise models._load_error(source, exc) from None
    dataset = data.load_training_data(base)
    if "validation" not in dataset.splits:
        raise AdaptextError(
            f"tune scores trials on a validation split, and {len(dataset.splits['train']):,} training examples are "
            f"too few to carve one (--validation-min-train {base.validation_min_train}); give a validation split, "
            "or --validation-min-train 0 to carve one anyway"
        )
    task = dataset.task
    for key in ("num_hidden_layers", "n_layers", "n_layer"):
        if isinstance(getattr(model_config, key, None), int):
            return getattr(model_config, key), task
    return 1, task  # depth unknown: top_layers is not searched


def _pruner(plan: Plan) -> Any:
    import optuna

    if plan.pruner == "none":
        return optuna.pruners.NopPruner()
    # A trial is judged against the finished ones only after a few have finished (a fifth of the study,
    # 2 to 5) and never before half an epoch (the first evaluations of a higher lr are noisy).
    return optuna.pruners.MedianPruner(
        n_startup_trials=min(5, max(2, plan.trials // 5)), n_warmup_steps=plan.base.evals_per_epoch // 2
    )


def _recover(optuna: Any, study: Any, output: Path, echo: Callable[[str], None]) -> None:
    """Trials a killed run left RUNNING are failed and queued again with their parameters; leftovers go,
    except the folder of a trial queued again: its checkpoint lets the retry resume (see _take_over)."""
    running = optuna.trial.TrialState.RUNNING
    for frozen in study.get_trials(deepcopy=False, states=(running,)):
        study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(frozen.params, user_attrs={"retry_of": frozen.number})
        echo(f"trial {frozen.number} was interrupted; its parameters are queued to run again")
    complete = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    keep = complete | {t.user_attrs["retry_of"] for t in queued if "retry_of" in t.user_attrs}
    folder = output / "trials"
    for path in folder.iterdir() if folder.is_dir() else []:
        # staging directories of a killed trial, checkpoints of pruned/failed ones that no retry resumes
        if path.name.startswith(".") or not (path.name.isdigit() and int(path.name) in keep):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _finished(optuna: Any, study: Any) -> list[Any]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def _search(optuna: Any, study: Any, plan: Plan, space: dict[str, Dimension], echo: Callable, progress: bool) -> None:
    done = len(_finished(optuna, study))
    if done >= plan.trials:
        echo(f"study {study.study_name}: {done} trials finished already (--trials {plan.trials}): nothing to run")
        return
    searched = ", ".join(f"{n} {describe(d)}" for n, d in space.items()) or "nothing (every option is fixed)"
    echo(f"study {study.study_name}: {done} of {plan.trials} trials finished; searching {searched}")
    started = time.perf_counter()
    for _ in range(plan.trials - done):  # one attempt per missing trial: a failed one is left to the next run
        if plan.timeout is not None and time.perf_counter() - started >= plan.timeout:
            echo(f"--timeout {plan.timeout:g} s reached; re-run to continue the study")
            break
        _run_trial(optuna, study, plan, space, echo, progress)


def _run_trial(
    optuna: Any, study: Any, plan: Plan, space: dict[str, Dimension], echo: Callable, progress: bool
) -> None:
    # lazy: the training stack loads when a trial runs, not when the CLI parses
    from adaptext import api

    trial = study.ask()
    folder = trial_dir(plan.output, trial.number)
    metric = plan.base.metric
    params: dict[str, Any] = {}
    records: list[dict[str, Any]] = []

    def on_eval(record: dict[str, Any]) -> None:
        records.append(record)
        trial.report(record[metric], step=len(records) - 1)
        if trial.should_prune():
            raise optuna.TrialPruned()

    started = time.perf_counter()
    outcome = None
    try:
        params.update({name: dim.suggest(trial, name) for name, dim in space.items()})
        cfg = trial_options(plan.base, params, folder)
        trial.set_user_attr("config", json.loads(json.dumps(cfg.to_dict())))
        trial.set_user_attr("dir", str(folder.relative_to(plan.output)))
        history = _take_over(trial, plan.output, cfg, echo)
        if history is not None:
            # The evaluations made before the interruption, reported again at their steps: the pruner judges
            # this trial as if it had never stopped (and may stop it here, as it would have then).
            for record in history:
                on_eval(record)
            cfg = dataclasses.replace(cfg, resume=True, overwrite=False)
        # The trial's own output (data, model, evaluation lines) goes to its log; the console gets one line.
        with (plan.output / "logs" / f"{folder.name}.log").open("w", encoding="utf-8") as log:
            with contextlib.redirect_stdout(log):
                outcome = api.train(cfg, progress=progress, on_eval=on_eval)
    except optuna.TrialPruned:
        pass
    except BaseException as exc:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if isinstance(exc, KeyboardInterrupt):  # tried again with its parameters, from the checkpoint it keeps
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
        else:
            shutil.rmtree(folder, ignore_errors=True)
        echo(f"{_label(trial.number, params)}: failed ({_first_line(exc) or type(exc).__name__})")
        raise
    label = _label(trial.number, params)
    seconds = time.perf_counter() - started
    trial.set_user_attr("seconds", round(seconds, 2))
    trial.set_user_attr("epochs", records[-1]["epoch"] if records else 0.0)  # how far it got
    if outcome is None:
        shutil.rmtree(folder, ignore_errors=True)  # its checkpoint, if one was taken
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        last = records[-1]  # pruning happens in on_eval, so there is one
        echo(f"{label}: pruned at epoch {last['epoch']:.2f} ({metric} {last[metric]:.4f}, {seconds:.0f} s)")
        return
    best = outcome.metrics["best"]
    trial.set_user_attr("validation", best)
    test = outcome.metrics.get("test") or {}
    trial.set_user_attr("test", {k: v for k, v in test.items() if isinstance(v, (int, float))})
    value = float(best[metric])
    if not math.isfinite(value):
        shutil.rmtree(folder, ignore_errors=True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        echo(f"{label}: failed (validation {metric} is {value}: training diverged)")
        return
    study.tell(trial, value)
    mark = "  * best so far" if study.best_trial.number == trial.number else ""
    echo(f"{label}: {metric} {value:.4f} at epoch {best['epoch']:.2f} ({seconds:.0f} s){mark}")


def _take_over(
    trial: Any, output: Path, cfg: config.TrainConfig, echo: Callable[[str], None]
) -> list[dict[str, Any]] | None:
    """A retried trial continues from the checkpoint of the attempt it retries, when that one is usable.

    The attempt's folder is renamed to this trial's (one atomic rename) rather than resumed where it is,
    so that trial N's model is always ``trials/NNNN``: ``user_attrs["dir"]``, ``logs/NNNN.log``,
    trials.csv, the ``best`` link and _recover (which keeps the folders of complete trials only) all
    assume it, and the failed attempt is left with no folder, like any failed trial. Until the model is
    swapped in whole at the end of training, the folder holds the checkpoint alone, as a fresh trial's
    does. Returns the evaluations made before the interruption, or None: the trial trains from
    scratch, and a line says why.
    """
    retry_of = trial.user_attrs.get("retry_of")
    if retry_of is None:
        return None
    interrupted = trial_dir(output, retry_of)
    if not checkpoint.state_path(interrupted).is_file():
        shutil.rmtree(interrupted, ignore_errors=True)  # killed before its first save, or after its model's
        echo(f"trial {trial.number} trains from scratch: trial {retry_of} left no checkpoint")
        return None
    try:  # read here for its options and evaluations, and once more by api.train: a retry's cost, once
        state = checkpoint.load(interrupted, cfg.to_dict())
    except checkpoint.UnusableCheckpoint as exc:
        shutil.rmtree(interrupted, ignore_errors=True)
        echo(f"trial {trial.number} trains from scratch: the checkpoint of trial {retry_of} {exc.reason}")
        return None
    os.replace(interrupted, cfg.output)
    echo(f"trial {trial.number} resumes trial {retry_of} from step {state['step']} of its checkpoint")
    return state["history"]


def _label(number: int, params: dict[str, Any]) -> str:
    return f"trial {number} " + " ".join(f"{n}={show(v)}" for n, v in params.items())


def _check_same_study(output: Path, saved: dict[str, Any], identity: dict[str, Any], space: dict[str, Any]) -> None:
    """A resumed study keeps its options (else its trials are not comparable) and its search space (Optuna's
    TPE sampler refuses a categorical dimension whose choices changed)."""

    def flat(ident: dict[str, Any]) -> dict[str, Any]:
        return {**ident["options"], **{k: v for k, v in ident.items() if k != "options"}}

    old, new = flat(saved["identity"]), flat(identity)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise AdaptextError(
            f"{output} holds a study of other options ({diff}); re-run with the same options or choose another --output"
        )
    changed = sorted(k for k in set(saved["space"]) | set(space) if saved["space"].get(k) != space.get(k))
    if changed:
        raise AdaptextError(
            f"{output} holds a study with another search space (changed: {', '.join(changed)}); re-run with the "
            "same --space and flags, or start a new study in another --output"
        )


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]
