"""The compare study's report: results tables, plots (PNG), report.md and a self-contained report.html."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from adaptext.artifacts import atomic_path
from adaptext.artifacts import write_text as _write_text
from adaptext.card import METHOD_NAMES
from adaptext.metrics import save_confusion_png

PLOTS = {
    "accuracy_vs_examples.png": "Accuracy vs labelled training examples (learning curve)",
    "accuracy_vs_params.png": "Accuracy vs trainable parameters",
    "accuracy_vs_time.png": "Accuracy vs training time",
    "learning_curves.png": "Validation accuracy per epoch",
    "confusion_best.png": "Confusion matrix of the best arm",
}


def arm_name(method: str, size: Any = None) -> str:
    name = "zero (untrained head)" if method == "zero" else f"{method} ({METHOD_NAMES.get(method, method)})"
    return name if size is None else f"{name} at {size}"


def curve_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """A learning curve as a table: one row per arm, one column per training size (accuracy mean ± std)."""
    sizes = results.get("train_sizes") or []
    if not sizes:
        return [], []
    cells: dict[tuple[str, str], dict[str, Any]] = {(a["method"], str(a["train_size"])): a for a in results["arms"]}
    header = ["method"]
    for size in sizes:
        rows = [
            a["train_rows_mean"]
            for m in results["methods"]
            if (a := cells.get((m, str(size)), {})).get("status") == "ok"
        ]
        header.append(f"{size} ({rows[0]:,.0f} examples)" if rows else str(size))
    table = []
    for method in results["methods"]:
        row = [arm_name(method)]
        for size in sizes:
            arm = cells.get((method, str(size)), {})
            if arm.get("status") != "ok":
                row.append("failed" if arm else "-")
                continue
            flag = " ⚠" if arm["at_or_below_chance"] else ""
            row.append(f"{_pm(arm, 'accuracy', 3)}{flag}")
        table.append(row)
    return header, table


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pm(arm: dict[str, Any], key: str, digits: int = 4) -> str:
    return f"{arm[f'{key}_mean']:.{digits}f} ± {arm[f'{key}_std']:.{digits}f}"


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "method", "accuracy", "macro-F1", "eval loss", "trainable (adapter + head)", "% of model",
        "weights on disk", "train s", "samples/s", "peak RSS MB", "note",
    ]  # fmt: skip
    rows = []
    for arm in results["arms"]:
        if arm["status"] != "ok":
            rows.append(
                [arm_name(arm["method"], arm.get("train_size")), "-", "-", "-", "-", "-", "-", "-", "-", "-",
                 f"failed: {arm['error']}"]
            )  # fmt: skip
            continue
        note = []
        if arm["at_or_below_chance"]:
            note.append(f"⚠ at or below chance ({arm['chance_accuracy']:.3f})")
        if arm.get("gpu_peak_mb"):
            note.append(f"GPU peak {arm['gpu_peak_mb']:.0f} MB")
        rows.append([
            arm_name(arm["method"], arm.get("train_size")),
            _pm(arm, "accuracy"),
            _pm(arm, "macro_f1"),
            f"{arm['loss_mean']:.4f}",
            f"{arm['trainable_params']:,} ({arm['adapter_params']:,} + {arm['head_params']:,})",
            f"{arm['trainable_percent']:.3f}%",
            _size(arm["size_bytes"]),
            f"{arm['train_seconds_mean']:.1f}",
            f"{arm['samples_per_second_mean']:.1f}" if arm["samples_per_second_mean"] else "-",
            f"{arm['peak_rss_mb']:.0f}",
            "; ".join(note),
        ])  # fmt: skip
    return header, rows


def per_class_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    done = [a for a in results["arms"] if a["status"] == "ok"]
    if not done:
        return [], []
    names = done[0]["class_names"]
    return ["method", *names], [
        [arm_name(a["method"], a.get("train_size")), *(f"{a['per_class_f1'][n]:.3f}" for n in names)] for a in done
    ]


def findings(results: dict[str, Any]) -> list[str]:
    """Plain sentences on what the study shows: best arm, the seeds' ordering, PEFT vs full (per size in a
    learning curve)."""
    if results.get("train_sizes"):
        return [
            f"At {size}: {line}"
            for size in results["train_sizes"]
            for line in findings({**results, "train_sizes": None,
                                  "arms": [a for a in results["arms"] if str(a.get("train_size")) == str(size)]})
        ]  # fmt: skip
    done = {a["method"]: a for a in results["arms"] if a["status"] == "ok"}
    if not done:
        return ["No arm finished."]
    best = max(done.values(), key=lambda a: a["accuracy_mean"])
    lines = [
        f"Best arm: **{best['method']}**, accuracy {_pm(best, 'accuracy')} on {best['n']:,} {best['split']} examples."
    ]
    order = [m for m in ("zero", "head", "lora") if m in done]
    if len(order) > 1:
        accs = [done[m]["accuracy_mean"] for m in order]
        holds = all(a < b for a, b in zip(accs, accs[1:]))
        shown = " < ".join(f"{m} {done[m]['accuracy_mean']:.4f}" for m in order)
        lines.append(f"Ordering {' < '.join(order)}: {'holds' if holds else 'does NOT hold'} ({shown}).")
    if "full" in done:
        for method, arm in done.items():
            if method in ("full", "zero", "head"):
                continue
            gap = 100 * (done["full"]["accuracy_mean"] - arm["accuracy_mean"])
            share = 100 * arm["trainable_params"] / max(done["full"]["trainable_params"], 1)
            lines.append(
                f"{method} vs full fine-tuning: {gap:+.2f} points behind, training {share:.2f}% of the parameters "
                f"in {arm['train_seconds_mean']:.0f} s vs {done['full']['train_seconds_mean']:.0f} s."
            )
    flagged = [m for m, a in done.items() if a["at_or_below_chance"]]
    if flagged:
        lines.append(f"At or below chance (majority-class rate): {', '.join(flagged)}.")
    return lines


# ---------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)


def write_plots(folder: Path, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [a for a in results["arms"] if a["status"] == "ok"]
    if not done:
        return []
    made = []
    if results.get("train_sizes"):
        _plot_examples(plt, folder, results, done)
        made.append("accuracy_vs_examples.png")
        largest = str(results["train_sizes"][-1])  # the other plots show the curve's last size
        done = [a for a in done if str(a["train_size"]) == largest] or done
    trained = [a for a in done if a["method"] != "zero"]
    zero = next((a for a in done if a["method"] == "zero"), None)
    chance = done[0]["chance_accuracy"]

    for name, key, xlabel, log in (
        ("accuracy_vs_params.png", "trainable_params", "trainable parameters (log scale)", True),
        ("accuracy_vs_time.png", "train_seconds_mean", "training time, s", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm in trained:
            x = max(arm[key], 1)
            ax.errorbar(x, arm["accuracy_mean"], yerr=arm["accuracy_std"], fmt="o", capsize=3)
            ax.annotate(arm["method"], (x, arm["accuracy_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if zero:
            ax.axhline(zero["accuracy_mean"], color="grey", ls="--", lw=1, label="zero (untrained head)")
        ax.axhline(chance, color="red", ls=":", lw=1, label="chance (majority class)")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{done[0]['split']} accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(PLOTS[name])
        fig.tight_layout()
        _save(fig, folder / name)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in trained:
        if arm["curve"]:
            ax.plot(
                [p["epoch"] for p in arm["curve"]],
                [p["accuracy"] for p in arm["curve"]],
                marker="o",
                label=arm["method"],
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    if any(arm["curve"] for arm in trained):
        ax.legend(fontsize=8, ncol=2)
    ax.set_title(PLOTS["learning_curves.png"])
    fig.tight_layout()
    _save(fig, folder / "learning_curves.png")
    plt.close(fig)

    best = max(done, key=lambda a: a["accuracy_mean"])
    with atomic_path(folder / "confusion_best.png") as tmp:
        title = f"best arm: {best['method']} (all seeds)"
        save_confusion_png(best["confusion_matrix"], best["class_names"], tmp, title)
    return made + [p for p in PLOTS if p != "accuracy_vs_examples.png"]


def _plot_examples(plt: Any, folder: Path, results: dict[str, Any], done: list[dict[str, Any]]) -> None:
    """Accuracy (mean ± std over splits) against the mean number of training examples, one line per arm."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in results["methods"]:
        arms = sorted((a for a in done if a["method"] == method), key=lambda a: a["train_rows_mean"])
        if arms:
            ax.errorbar(
                [max(a["train_rows_mean"], 1) for a in arms], [a["accuracy_mean"] for a in arms],
                yerr=[a["accuracy_std"] for a in arms], marker="o", capsize=3, label=method,
            )  # fmt: skip
    ax.axhline(done[0]["chance_accuracy"], color="red", ls=":", lw=1, label="chance (majority class)")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel(f"{done[0]['split']} accuracy (mean ± std over splits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(PLOTS["accuracy_vs_examples.png"])
    fig.tight_layout()
    _save(fig, folder / "accuracy_vs_examples.png")
    plt.close(fig)


# ---------------------------------------------------------------- documents


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _setup_line(results: dict[str, Any]) -> str:
    cfg = results["config"]
    return (
        f"Data `{cfg.get('data') or 'built-in demo set'}`, model `{cfg['model']}`, train size {cfg.get('train_size') or 'all'}, "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, max length {cfg['max_length']}, "
        f"{results['seeds']} seed(s) from {cfg['seed']}; adaptext {results['versions'].get('adaptext')}, "
        f"torch {results['versions'].get('torch')}, peft {results['versions'].get('peft')}."
    )


def write_all(folder: Path, results: dict[str, Any]) -> None:
    plots = write_plots(folder, results)
    header, rows = summary_rows(results)
    curve_header, curve = curve_rows(results)
    pc_header, pc_rows = per_class_rows(results)
    notes = findings(results)
    lrs = ", ".join(
        f"{a['method']} {a['lr']:g}" for a in results["arms"] if a["status"] == "ok" and a["method"] != "zero"
    )
    md = [
        "# adaptext compare",
        "",
        _setup_line(results),
        "",
        *(f"- {line}" for line in notes),
        "",
        *(
            [
                "## Learning curve: test accuracy by training size (mean ± std over splits; ⚠ at or below chance)",
                "",
                _md_table(curve_header, curve),
                "",
            ]
            if curve
            else []
        ),
        "## Results (mean ± std over seeds)",
        "",
        _md_table(header, rows),
        "",
        f"Learning rates: {lrs}.",
        "",
        "## Per-class F1",
        "",
        _md_table(pc_header, pc_rows) if pc_rows else "-",
        "",
        "## Plots",
        "",
        *(f"![{PLOTS[p]}]({p})\n" for p in plots),
        "Machine-readable: `results.json`. Every arm's model is in `runs/<method>-seed<N>` and loads with "
        "`adaptext predict --model runs/<method>-seed<N>`.",
        "",
    ]
    _write_text(folder / "report.md", "\n".join(md))

    images = "".join(
        f'<figure><img alt="{html.escape(PLOTS[p])}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / p).read_bytes()).decode()}"><figcaption>{html.escape(PLOTS[p])}</figcaption></figure>'
        for p in plots
    )
    items = "".join(f"<li>{html.escape(line).replace('**', '')}</li>" for line in notes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>adaptext compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 560px; }}
</style></head><body>
<h1>adaptext compare</h1>
<p>{html.escape(_setup_line(results)).replace("`", "")}</p>
<ul>{items}</ul>
{"<h2>Learning curve (mean ± std over splits)</h2>" + _html_table(curve_header, curve) if curve else ""}
<h2>Results (mean ± std over seeds)</h2>
{_html_table(header, rows)}
<p>Learning rates: {html.escape(lrs)}.</p>
<h2>Per-class F1</h2>
{_html_table(pc_header, pc_rows) if pc_rows else "-"}
<h2>Plots</h2>
{images}
</body></html>
"""
    _write_text(folder / "report.html", page)
