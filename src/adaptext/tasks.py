"""What a model predicts: one class (softmax), any set of classes (sigmoid per label), or a number.

Everything that depends on the kind of label goes through a :class:`Task`: the training loss, the
label tensor, how logits become scores, the metrics, which metric is better when lower, and what
``predict`` and ``serve`` answer. A model directory records its task in ``adaptext.json`` (models saved
before tasks existed are single-label).

- **single-label**: one class per text; softmax, cross-entropy (or focal), accuracy and F1.
- **multi-label**: any number of classes per text (list cells or delimited strings); one sigmoid per
  class, binary cross-entropy; a class is predicted when its probability reaches its threshold, tuned
  per class on the validation split to maximise that class's F1 (or fixed with ``--threshold``).
- **regression**: one real number per text; mean squared error on standardised targets, and the
  standardisation folded into the head after training, so the saved model outputs the target's scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptext import metrics
from adaptext.config import TASK_METRICS, TrainConfig
from adaptext.errors import AdaptextError
from adaptext.metrics import sigmoid, softmax

PROBLEM_TYPES = {
    "single-label": "single_label_classification",
    "multi-label": "multi_label_classification",
    "regression": "regression",
}
# What "--metric auto" selects by. Single-label: the validation cross-entropy, as transformers' Trainer
# does, because accuracy on a few hundred examples moves in steps of 0.5 points and often crowns an early
# epoch by a couple of examples (docs/RESULTS.md: AG News at 500 examples, 0.835 -> 0.858 on test).
AUTO_METRIC = {"single-label": "loss", "multi-label": "micro_f1", "regression": "rmse"}
LOWER_IS_BETTER = ("loss", "rmse", "mae", "mse")
DEFAULT_THRESHOLD = 0.5


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


@dataclass(frozen=True)
class Task:
    """The label kind of a dataset or a saved model, plus what training learned about its labels:
    per-class ``thresholds`` (multi-label) and the targets' ``mean``/``std`` (regression)."""

    kind: str = "single-label"
    thresholds: tuple[float, ...] | None = None
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Task:
        saved = meta.get("task") or {"kind": "single-label"}
        thresholds = saved.get("thresholds")
        return cls(saved["kind"], tuple(thresholds) if thresholds else None)

    def to_meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "problem_type": PROBLEM_TYPES[self.kind]}
        if self.kind == "multi-label":
            out["thresholds"] = list(self.thresholds or ())
        if self.kind == "regression":
            out["target_mean"], out["target_std"] = self.mean, self.std
        return out

    @property
    def problem_type(self) -> str:
        return PROBLEM_TYPES[self.kind]

    def resolve_metric(self, metric: str) -> str:
        """``--metric`` for this task: "auto" becomes the task's usual one; a metric the task does not
        report is one AdaptextError line."""
        if metric == "auto":
            return AUTO_METRIC[self.kind]
        if metric not in TASK_METRICS[self.kind]:
            raise AdaptextError(
                f"--metric {metric} does not apply to {self.kind} data; choose one of {', '.join(TASK_METRICS[self.kind])}"
            )
        return metric

    # ------------------------------------------------------------ training

    def label_tensor(self, labels: Sequence[Any], num_labels: int) -> torch.Tensor:
        """Per example: a class id (long), a multi-hot row (float), or a standardised target (float)."""
        if self.kind == "multi-label":
            hot = torch.zeros(len(labels), num_labels)
            for row, ids in enumerate(labels):
                hot[row, list(ids)] = 1.0
            return hot
        if self.kind == "regression":
            return (torch.tensor(labels, dtype=torch.float64) - self.mean).div(self.std).float()[:, None]
        return torch.tensor(labels, dtype=torch.long)

    def in_training_units(self, logits: np.ndarray) -> np.ndarray:
        """Regression heads train on standardised targets: their raw outputs, back on the target's scale."""
        return logits * self.std + self.mean if self.kind == "regression" else logits

    # ------------------------------------------------------------ scoring

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities (softmax: they sum to 1; sigmoid: one per class) or the predicted values."""
        if self.kind == "multi-label":
            return sigmoid(logits)
        if self.kind == "regression":
            return logits.astype(np.float64)
        return softmax(logits)

    def metrics(
        self, labels: Sequence[Any], logits: np.ndarray, class_names: list[str], brief: bool = False
    ) -> dict[str, Any]:
        if self.kind == "multi-label":
            thresholds = np.asarray(self.thresholds or [DEFAULT_THRESHOLD] * len(class_names))
            return metrics.multilabel_metrics(
                self.label_tensor(labels, len(class_names)).numpy(), logits, class_names, thresholds, brief
            )
        if self.kind == "regression":
            return metrics.regression_metrics(np.asarray(labels, dtype=np.float64), logits[:, 0], class_names[0])
        return metrics.classification_metrics(labels, logits, class_names, brief)

    def results(self, logits: np.ndarray, class_names: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        """What ``predict`` answers per text, from logits (see :meth:`rank`)."""
        return self.rank(self.scores(logits), class_names, top_k)

    def rank(self, scores: np.ndarray, class_names: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        """Per row of :meth:`scores`: single-label ``label``, ``score``, ``top_k``, ``probabilities``;
        multi-label ``labels`` (each class at or above its threshold), ``top_k``, ``probabilities``;
        regression ``value`` and ``label`` (the target's name)."""
        if self.kind == "regression":
            return [{"value": float(row[0]), "label": class_names[0]} for row in scores]
        if self.kind == "single-label":
            return rank(scores, class_names, top_k)
        thresholds = np.asarray(self.thresholds or [DEFAULT_THRESHOLD] * len(class_names))
        k = max(1, min(top_k, len(class_names)))
        out = []
        for row in scores:
            order = np.argsort(-row)
            out.append(
                {
                    "labels": [class_names[i] for i in order if row[i] >= thresholds[i]],
                    "top_k": [{"label": class_names[i], "score": float(row[i])} for i in order[:k]],
                    "probabilities": {name: float(p) for name, p in zip(class_names, row)},
                }
            )
        return out

    def with_tuned_thresholds(self, labels: Sequence[Any], logits: np.ndarray, num_labels: int, fixed: float | None):
        """Multi-label: the per-class thresholds that maximise each class's F1 on these (validation) rows;
        ``fixed`` uses one threshold for every class instead. Other tasks: unchanged."""
        if self.kind != "multi-label":
            return self
        if fixed is not None:
            return Task(self.kind, tuple([float(fixed)] * num_labels))
        truth = self.label_tensor(labels, num_labels).numpy().astype(bool)
        return Task(self.kind, tuple(tune_thresholds(truth, sigmoid(logits))))


def tune_thresholds(truth: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per class, the probability cut (from a grid of 0.05 .. 0.95) with the best F1 on these rows.

    A class with no positive row keeps 0.5: there is nothing to tune it on. Ties go to the cut nearest
    0.5, so a threshold moves only when it wins something.
    """
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    order = np.argsort(np.abs(grid - DEFAULT_THRESHOLD), kind="stable")
    out = []
    for c in range(truth.shape[1]):
        positive = truth[:, c]
        if not positive.any():
            out.append(DEFAULT_THRESHOLD)
            continue
        predicted = probs[:, c][:, None] >= grid[None, :]
        tp = (predicted & positive[:, None]).sum(0)
        f1 = 2 * tp / (predicted.sum(0) + positive.sum())
        out.append(float(grid[order][np.argmax(f1[order])]))
    return out


# ---------------------------------------------------------------- losses


def class_weight_tensor(labels: list[int], num_labels: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    weights = len(labels) / (num_labels * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def positive_weight_tensor(labels: Sequence[Sequence[int]], num_labels: int) -> torch.Tensor:
    """Multi-label class weights: per class, negatives over positives (BCE's pos_weight), at most 100."""
    positives = np.zeros(num_labels)
    for ids in labels:
        positives[list(ids)] += 1
    weights = (len(labels) - positives) / np.maximum(positives, 1)
    return torch.tensor(np.clip(weights, 1.0, 100.0), dtype=torch.float32)


def focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): each example's cross-entropy times (1 - p_true)^gamma.

    An example the model already gets right with p_true 0.9 counts 100x less at gamma 2, so the
    gradient goes to the hard (often minority-class) ones. ``weight`` (per class, focal's alpha)
    is applied and normalised exactly as ``nn.CrossEntropyLoss(weight=...)`` does: sum(w * loss) /
    sum(w). So gamma 0 *is* (weighted) cross-entropy, value and gradient.
    """
    log_p_true = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    losses = -log_p_true
    if gamma:
        # 1 - p computed as -expm1(log p) keeps precision near p = 1; the floor keeps the gradient of
        # x^gamma (gamma < 1) finite where the model is certain.
        losses = (-torch.expm1(log_p_true)).clamp_min(1e-12) ** gamma * losses
    if weight is None:
        return losses.mean()
    example_weights = weight[labels]
    return (example_weights * losses).sum() / example_weights.sum()


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-label focal loss: each (example, class) binary cross-entropy times (1 - p_t)^gamma, where
    p_t is the probability given to the right answer; gamma 0 is ``BCEWithLogitsLoss(pos_weight=...)``."""
    losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    if gamma:
        p_t = torch.where(targets > 0.5, torch.sigmoid(logits), torch.sigmoid(-logits))
        losses = (1 - p_t).clamp_min(1e-12) ** gamma * losses
    return losses.mean()


def make_loss(
    cfg: TrainConfig, train_labels: Sequence[Any], num_labels: int, device: torch.device, task: Task | None = None
) -> Callable:
    """The training loss for the task and ``cfg.loss``, class-weighted with ``cfg.class_weights``."""
    task = task or Task()
    if task.kind == "regression":
        return nn.MSELoss()
    if task.kind == "multi-label":
        pos_weight = positive_weight_tensor(train_labels, num_labels).to(device) if cfg.class_weights else None
        if cfg.loss == "focal":
            return lambda logits, labels: sigmoid_focal_loss(logits, labels, cfg.focal_gamma, pos_weight)
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    weights = class_weight_tensor(list(train_labels), num_labels).to(device) if cfg.class_weights else None
    if cfg.loss == "focal":
        return lambda logits, labels: focal_loss(logits, labels, cfg.focal_gamma, weights)
    return nn.CrossEntropyLoss(weight=weights)


# ---------------------------------------------------------------- regression heads


def output_layer(model: nn.Module, width: int = 1) -> nn.Linear:
    """The head's trained output layer: the one trainable ``Linear`` with ``width`` outputs (1 for regression).
    An adapter's own matrices are not candidates (LoRA's A is a trainable ``Linear`` with r outputs: with
    r = 8 it would look like the head of 8-class data)."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft's import is slow and inference may not need it

    inside_adapters = {id(sub) for module in model.modules() if isinstance(module, BaseTunerLayer)
                       for sub in module.modules()}  # fmt: skip
    last = [
        module
        for module in model.modules()
        if isinstance(module, nn.Linear)
        and module.out_features == width
        and module.weight.requires_grad
        and id(module) not in inside_adapters
    ]
    if len(last) != 1:
        raise AdaptextError(
            f"expected one trained output layer of width {width} in the head, found {len(last)}; "
            "this architecture's head is not supported for multi-label or regression training"
        )
    return last[0]


def init_label_priors(model: nn.Module, labels: Sequence[Sequence[int]], num_labels: int) -> None:
    """Start a multi-label head at each class's base rate: output bias = logit(share of rows with the
    class). A fresh head says 0.5 for every class, and most (row, class) cells are negatives, so BCE
    would spend its first epochs learning the rates; from the rates it learns the texts at once.
    (A head without a bias, GPT-2's ``score``, starts at 0.5.)"""
    layer = output_layer(model, num_labels)
    if layer.bias is None:
        return
    positives = np.zeros(num_labels)
    for ids in labels:
        positives[list(ids)] += 1
    rate = np.clip(positives / max(len(labels), 1), 1e-3, 1 - 1e-3)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor(np.log(rate / (1 - rate)), dtype=layer.bias.dtype))


def fold_target_scale(model: nn.Module, mean: float, std: float) -> None:
    """Make a regression head output the target's scale: it trained on (y - mean) / std, so its last
    layer's weight and bias are scaled by std and the bias shifted by mean. Then the saved model, the
    ONNX export, ``serve`` and plain transformers all predict real values with nothing else to apply.
    (A head without a bias, like GPT-2's ``score``, trains on y / std: ``mean`` is 0 for it.)"""
    layer = output_layer(model)
    with torch.no_grad():
        layer.weight.mul_(std)
        if layer.bias is not None:
            layer.bias.mul_(std).add_(mean)
        elif mean:
            raise AdaptextError("regression: the head's output layer has no bias to carry the target mean")


def rank(probs: np.ndarray, class_names: list[str], top_k: int = 1) -> list[dict[str, Any]]:
    """Per row of probabilities: the best label and score, the top k, and every class's probability."""
    k = max(1, min(top_k, len(class_names)))
    results = []
    for row in probs:
        order = np.argsort(-row)[:k]
        results.append(
            {
                "label": class_names[order[0]],
                "score": float(row[order[0]]),
                "top_k": [{"label": class_names[i], "score": float(row[i])} for i in order],
                "probabilities": {name: float(p) for name, p in zip(class_names, row)},
            }
        )
    return results
