"""The end of a tune study: every trial in trials.csv and a table, the best trial's options in best.yaml
(usable as --config or --preset), the ``best`` link to its model, and the results in tune.json."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from adaptext import artifacts
from adaptext.tune_space import show

MARKER = "tune.json"  # the study's identity and search space, then its results
NOT_SAVED = ("output", "overwrite", "resume")  # where a trial was written; best.yaml leaves them to the user


def finish(
    optuna: Any, study: Any, output: Path, metric: str, planned: int, echo: Callable[[str], None]
) -> dict[str, Any]:
    """trials.csv, the table, best.yaml and the ``best`` link; the results in tune.json."""
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(n for t in trials for n in t.params))
    rows = [
        {"number": t.number, "state": t.state.name.lower(), "value": t.value, **{n: t.params.get(n) for n in names},
         "epochs": t.user_attrs.get("epochs"), "seconds": t.user_attrs.get("seconds")}
        for t in trials if t.state != optuna.trial.TrialState.WAITING
    ]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["number", "state", "value", *names, "epochs", "seconds"])
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_text(output / "trials.csv", buffer.getvalue())
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if complete else None
    echo(table(rows, names, metric, best.number if best else None))
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")}
    results: dict[str, Any] = {"trials": len(rows), **counts, "best": None}
    if best is None:
        echo(f"no trial finished; see {output / 'logs'}")
    else:
        best_dir = output / best.user_attrs["dir"]
        saved = {k: v for k, v in best.user_attrs["config"].items() if k not in NOT_SAVED}
        header = (
            f"# adaptext tune, study {study.study_name}: best of {counts['complete']} complete trials "
            f"({counts['pruned']} pruned)\n# trial {best.number}: validation {metric} {best.value:.6g}; "
            f"model in {best_dir}\n# re-run: adaptext train --config best.yaml --output DIR (or --preset best.yaml)\n"
        )
        artifacts.write_text(output / "best.yaml", header + yaml.safe_dump(saved, sort_keys=False))
        link(output / "best", Path(best.user_attrs["dir"]))
        test = best.user_attrs.get("test") or {}
        results["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "dir": best.user_attrs["dir"], "validation": best.user_attrs.get("validation"), "test": test}  # fmt: skip
        tested = f"; test {metric} {test[metric]:.4f}" if metric in test else ""
        echo(f"best: trial {best.number}, validation {metric} {best.value:.4f}{tested} -> {output / 'best.yaml'}")
    unfinished = planned - counts["complete"] - counts["pruned"]
    if unfinished > 0:
        echo(f"{unfinished} of {planned} trials still to run: re-run the same command to continue")
    marker = output / MARKER
    artifacts.write_json(marker, {**json.loads(marker.read_text(encoding="utf-8")), "results": results})
    return results


def table(rows: list[dict[str, Any]], names: list[str], metric: str, best: int | None) -> str:
    header = ["trial", "state", metric, *names, "epochs", "seconds"]
    body = [
        [f"{r['number']}{'*' if r['number'] == best else ''}", r["state"], "-" if r["value"] is None else f"{r['value']:.4f}",
         *(show(r[n]) for n in names), show(r["epochs"]), show(r["seconds"] and round(r["seconds"]))]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in [header, *body])


def link(path: Path, target: Path) -> None:
    """``OUTPUT/best`` -> ``trials/NNNN``, swapped in atomically; skipped where symlinks are not allowed."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp, target_is_directory=True)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
