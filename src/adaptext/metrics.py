"""Metrics from logits: single-label (accuracy, P/R/F1 macro/weighted/per class, confusion, loss),
multi-label (micro/macro F1, subset accuracy, Hamming loss, per class) and regression (RMSE, MAE, R², r)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # exact, and no overflow warning for large |x|


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


def multilabel_metrics(
    truth: np.ndarray, logits: np.ndarray, class_names: list[str], thresholds: np.ndarray, brief: bool = False
) -> dict[str, Any]:
    """Multi-label metrics: ``truth`` is multi-hot (rows x classes); a class is predicted when its sigmoid
    reaches its threshold. Subset accuracy counts rows whose whole label set is right."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true = truth.astype(bool)
    probs = sigmoid(logits)
    y_pred = probs >= thresholds[None, :]
    # Binary cross-entropy per (row, class), averaged: what training minimises (without pos_weight).
    log_p = np.log(np.clip(probs, 1e-12, 1.0))
    log_not_p = np.log(np.clip(1.0 - probs, 1e-12, 1.0))
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "subset_accuracy": float((y_true == y_pred).all(axis=1).mean()) if len(y_true) else 0.0,
        "hamming_loss": float((y_true != y_pred).mean()) if y_true.size else 0.0,
        "loss": float(-(np.where(y_true, log_p, log_not_p)).mean()) if y_true.size else 0.0,
    }
    present = [c for c in range(len(class_names)) if y_true[:, c].any() or y_pred[:, c].any()]
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = (
            precision_recall_fscore_support(y_true[:, present], y_pred[:, present], average=average, zero_division=0)
            if present
            else (0.0, 0.0, 0.0, None)
        )
        out[f"{average}_f1"] = float(f)
        if not brief:
            out[f"{average}_precision"], out[f"{average}_recall"] = float(p), float(r)
    if brief:
        return out
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    out["per_class"] = {
        name: {
            "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i]),
            "threshold": float(thresholds[i]),
        }
        for i, name in enumerate(class_names)
    }  # fmt: skip
    out["class_names"] = list(class_names)
    out["thresholds"] = [float(x) for x in thresholds]
    return out


def regression_metrics(truth: np.ndarray, predicted: np.ndarray, target: str) -> dict[str, Any]:
    """Regression metrics on the target's own scale; ``loss`` is the mean squared error."""
    from scipy.stats import pearsonr, spearmanr

    errors = predicted - truth
    mse = float((errors**2).mean()) if len(truth) else 0.0
    spread = float(((truth - truth.mean()) ** 2).sum()) if len(truth) else 0.0
    constant = len(truth) < 2 or np.ptp(truth) == 0 or np.ptp(predicted) == 0
    return {
        "n": int(len(truth)),
        "loss": mse,
        "mse": mse,
        "rmse": mse**0.5,
        "mae": float(np.abs(errors).mean()) if len(truth) else 0.0,
        "r2": 1.0 - float((errors**2).sum()) / spread if spread else 0.0,
        # Correlation is undefined when either side is constant (an untrained head): reported as 0.
        "pearson": 0.0 if constant else float(pearsonr(truth, predicted).statistic),
        "spearman": 0.0 if constant else float(spearmanr(truth, predicted).statistic),
        "target": target,
    }


# Per kind of metrics: the figures of its one-line summary, in order.
HEADLINE = {
    "accuracy": ("accuracy", "macro_f1", "weighted_f1", "loss"),
    "subset_accuracy": ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "loss"),
    "rmse": ("rmse", "mae", "r2", "pearson", "spearman"),
}


def headline(metrics: dict[str, Any], prefix: str = "") -> str:
    """``accuracy=0.91  macro_f1=0.90 ...`` for whichever task the metrics are of."""
    keys = next(keys for marker, keys in HEADLINE.items() if marker in metrics)
    return "  ".join(f"{prefix}{key} {metrics[key]:.4f}" if prefix else f"{key}={metrics[key]:.4f}" for key in keys)


def format_report(metrics: dict[str, Any]) -> str:
    """A plain-text table like sklearn's classification_report."""
    lines = [
        f"n={metrics['n']}  " + headline(metrics) + (f"  ({metrics['precision']})" if "precision" in metrics else "")
    ]
    per_class = metrics.get("per_class")
    if per_class:
        width = max(12, *(len(n) for n in per_class))
        tuned = "threshold" in next(iter(per_class.values()))
        lines.append(
            f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"
            + ("  threshold" if tuned else "")
        )
        for name, row in per_class.items():
            lines.append(
                f"{name:<{width}} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} {row['support']:>8}"
                + (f"  {row['threshold']:>9.2f}" if tuned else "")
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
