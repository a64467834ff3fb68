"""Classification metrics from logits: accuracy, P/R/F1 (macro, weighted, per class), confusion, loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy(labels: np.ndarray, logits: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def classification_metrics(
    labels: list[int] | np.ndarray, logits: np.ndarray, class_names: list[str], brief: bool = False
) -> dict[str, Any]:
    """Metrics for single-label classification. ``brief`` skips the per-class report."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = logits.argmax(axis=1)
    ids = list(range(len(class_names)))
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()),
        "loss": cross_entropy(y_true, logits),
    }
    # Macro averages run over the classes present in the data, so a class missing from a small
    # evaluation slice does not count as a zero F1.
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=average, zero_division=0)
        out[f"{average}_f1"] = float(f)
        if not brief:
            out[f"{average}_precision"] = float(p)
            out[f"{average}_recall"] = float(r)
    if brief:
        return out
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=ids).tolist()
    out["class_names"] = list(class_names)
    return out


def format_report(metrics: dict[str, Any]) -> str:
    """A plain-text table like sklearn's classification_report."""
    lines = [
        f"n={metrics['n']}  accuracy={metrics['accuracy']:.4f}  macro_f1={metrics['macro_f1']:.4f}  "
        f"weighted_f1={metrics['weighted_f1']:.4f}  loss={metrics['loss']:.4f}"
    ]
    per_class = metrics.get("per_class")
    if per_class:
        width = max(12, *(len(n) for n in per_class))
        lines.append(f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for name, row in per_class.items():
            lines.append(
                f"{name:<{width}} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} {row['support']:>8}"
            )
    matrix = metrics.get("confusion_matrix")
    if matrix and len(matrix) <= 20:
        names = metrics["class_names"]
        width = max(8, *(len(n) for n in names))
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.append(" " * (width + 1) + " ".join(f"{n[:8]:>8}" for n in names))
        lines += [f"{name:<{width}} " + " ".join(f"{c:>8}" for c in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)


def save_confusion_png(matrix: list[list[int]], class_names: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix heat map with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(class_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 20:
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    color="white" if rates[i, j] > 0.5 else "black",
                    fontsize=8,
                )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
