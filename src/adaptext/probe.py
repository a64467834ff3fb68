"""A head that starts from what the frozen encoder already knows (linear probing, then fine-tuning).

A fresh head is random: on a few dozen examples, the first steps of fine-tuning spend the data
teaching the head and push noise back into the encoder. Here the head's output layer starts as a
logistic regression fitted on the frozen model's features of the training examples (what the output
layer reads: the pooled vector, or a RoBERTa-style head's hidden layer). This is LP-FT (Kumar et al.,
ICLR 2022, "Fine-Tuning can Distort Pretrained Features"), and the probe alone is the "frozen body +
logistic head" baseline of the SetFit paper. It costs one forward pass over at most ``MAX_ROWS``
training examples and a few seconds of scikit-learn.

The probe's cross-validated accuracy on the training examples is reported: an honest held-out estimate
even when the data is too small to carve a validation split from.

After fine-tuning, ``refit_head`` fits the output layer again on the trained encoder's features (SetFit's
second stage): at 8 examples per class it is worth +0.5 to +7 points over the head that fine-tuning left
(docs/RESULTS.md "Few labels").
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adaptext.batching import collate, inference_batches
from adaptext.contrastive import FeatureTap
from adaptext.precision import autocast
from adaptext.tasks import output_layer

MAX_ROWS = 4096  # the probe sees at most this many training examples (stratification is not needed: it
# only starts the head, and 4,096 rows pin a linear model down)
FOLDS = 4


@dataclass
class Probe:
    rows: int
    cv_accuracy: float | None  # None when a class has too few examples to hold any out

    def describe(self) -> str:
        held = f"{FOLDS}-fold accuracy {self.cv_accuracy:.3f}" if self.cv_accuracy is not None else "no folds"
        return f"logistic regression on the frozen encoder's features of {self.rows:,} examples ({held})"


@torch.no_grad()
def features(
    model: nn.Module, ids: list[list[int]], pad_id: int, layer: nn.Module, precision: str, batch_size: int = 64
) -> np.ndarray:
    """What ``layer`` reads for each text, in input order, with the model in eval mode."""
    device = next(model.parameters()).device
    out = np.zeros((len(ids), layer.in_features), dtype=np.float32)
    tap = FeatureTap()  # the same reading of the head's input as the contrastive term's
    was_training = model.training
    model.eval()
    try:
        with tap.attached(layer):
            for batch in inference_batches([len(x) for x in ids], batch_size, device):
                inputs = {k: v.to(device) for k, v in collate([ids[i] for i in batch], pad_id).items()}
                with autocast(precision, device):
                    model(**inputs)
                out[batch] = tap.pooled(inputs["attention_mask"].sum(1)).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def fit_head(
    model: nn.Module,
    ids: list[list[int]],
    labels: list[int],
    num_labels: int,
    pad_id: int,
    precision: str,
    seed: int,
) -> Probe:
    """Set the output layer to a logistic regression on the frozen features; return what it scored."""
    layer, rows, weight, bias, cv = _fit_on_features(model, ids, labels, num_labels, pad_id, precision, seed, True)
    _set(layer, weight, bias)
    return Probe(rows, cv)


def _fit_on_features(
    model: nn.Module, ids: list[list[int]], labels: list[int], num_labels: int, pad_id: int, precision: str,
    seed: int, folds: bool,
) -> tuple[nn.Linear, int, np.ndarray, np.ndarray, float | None]:  # fmt: skip
    """The output layer, how many rows were read, and a logistic regression fitted on what it reads."""
    layer = output_layer(model, num_labels)
    rows = _rows(len(ids), seed)
    x = features(model, [ids[i] for i in rows], pad_id, layer, precision).astype(np.float64)
    y = np.asarray([labels[i] for i in rows])
    return (layer, len(rows), *_logistic(x, y, num_labels, layer.bias is not None, seed, folds))


@dataclass
class Refit:
    rows: int
    kept: bool
    trained_accuracy: float | None = None  # on validation; None when there is none (then the refit is kept)
    refit_accuracy: float | None = None

    def describe(self) -> str:
        what = f"logistic regression refitted on the trained encoder's features of {self.rows:,} examples"
        if self.trained_accuracy is None:
            return f"{what} (no validation: kept, as measured in docs/RESULTS.md 'Few labels')"
        verdict = "kept" if self.kept else "not kept: the trained head scored at least as high"
        return (
            f"{what}: validation accuracy {self.refit_accuracy:.3f} vs the trained head's "
            f"{self.trained_accuracy:.3f}, {verdict}"
        )

    def to_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "kept": self.kept, "trained_accuracy": self.trained_accuracy,
                "refit_accuracy": self.refit_accuracy}  # fmt: skip


def refit_head(
    model: nn.Module, ids: list[list[int]], labels: list[int], num_labels: int, pad_id: int, precision: str,
    seed: int, validation: tuple[list[list[int]], list[int]] | None = None,
    pool: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Refit:  # fmt: skip
    """SetFit's second stage after fine-tuning: the output layer refitted as a logistic regression on
    the *trained* encoder's features. The trained head followed the features with a few hundred noisy
    steps; the refit is the best linear reading of where they ended. With a validation split both
    heads are scored on it (``pool`` turns window rows into texts) and the better one is kept (a tie
    keeps the trained head); without one the refit is kept."""
    layer, rows, weight, bias, _ = _fit_on_features(model, ids, labels, num_labels, pad_id, precision, seed, False)
    if validation is None:
        _set(layer, weight, bias)
        return Refit(rows, kept=True)
    val_x = features(model, validation[0], pad_id, layer, precision).astype(np.float64)
    trained_w = layer.weight.detach().float().cpu().numpy().astype(np.float64)
    trained_b = layer.bias.detach().float().cpu().numpy().astype(np.float64) if layer.bias is not None else 0.0
    pool = pool or (lambda logits: logits)
    truth = np.asarray(validation[1])
    before = float((pool(val_x @ trained_w.T + trained_b).argmax(1) == truth).mean())
    after = float((pool(val_x @ weight.T + bias).argmax(1) == truth).mean())
    if after > before:
        _set(layer, weight, bias)
    return Refit(rows, after > before, before, after)


def _rows(count: int, seed: int) -> list[int]:
    rows = list(range(count))
    return sorted(random.Random(seed).sample(rows, MAX_ROWS)) if count > MAX_ROWS else rows


def _logistic(
    x: np.ndarray, y: np.ndarray, num_labels: int, intercept: bool, seed: int, folds: bool = True
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """A logistic regression's weight and bias as ``num_labels`` rows, and its k-fold accuracy (``folds``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    classifier = LogisticRegression(max_iter=2000, fit_intercept=intercept)
    smallest = np.bincount(y, minlength=num_labels)[np.unique(y)].min()
    cv = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on separable few-shot data
        if folds and smallest >= 2 and len(np.unique(y)) > 1:
            splitter = StratifiedKFold(min(FOLDS, int(smallest)), shuffle=True, random_state=seed)
            cv = float(cross_val_score(classifier, x, y, cv=splitter).mean())
        classifier.fit(x, y)
    weight = np.zeros((num_labels, x.shape[1]))
    bias = np.zeros(num_labels)
    present = classifier.classes_
    if len(present) == 2:  # scikit-learn fits one row for two classes: split it evenly between them
        weight[present[1]], weight[present[0]] = classifier.coef_[0] / 2, -classifier.coef_[0] / 2
        bias[present[1]], bias[present[0]] = classifier.intercept_[0] / 2, -classifier.intercept_[0] / 2
    else:
        weight[present] = classifier.coef_
        bias[present] = classifier.intercept_
    if len(present) < num_labels:  # a class with no training example: never predicted
        bias[np.setdiff1d(np.arange(num_labels), present)] = bias[present].min() - 10.0
    return weight, bias, cv


def _set(layer: nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
