"""Inference on a trained model: merged LoRA weights, length-sorted batches, probabilities, top-k."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from adaptext.artifacts import LoadedModel, load_model
from adaptext.batching import check_texts, pick_device, predict_logits
from adaptext.errors import AdaptextError
from adaptext.precision import resolve as resolve_precision
from adaptext.tasks import Task

if TYPE_CHECKING:
    from adaptext.export import OnnxClassifier


class Classifier:
    """A reloaded adaptext model. ``adaptext.load(dir).predict(["text", ...])``."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 64, precision: str = "auto"):
        self.loaded = loaded
        self.batch_size = batch_size
        self.device = next(loaded.model.parameters()).device
        self.precision = resolve_precision(precision, self.device)

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    @property
    def task(self) -> Task:
        """What the model predicts: single-label, multi-label (with its thresholds) or regression."""
        return self.loaded.task

    @property
    def meta(self) -> dict[str, Any]:
        """The model directory's adaptext.json (base model, resolved training config, versions)."""
        return self.loaded.meta

    def logits(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        windowing = self.loaded.windowing
        rows = windowing.encode(self.loaded.tokenizer, texts)
        pad_id = self.loaded.tokenizer.pad_token_id
        logits = predict_logits(self.loaded.model, rows.ids, pad_id, self.batch_size, self.precision, self.device)
        return windowing.pool_logits(logits, rows)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Per text: class probabilities (single-label: softmax, summing to 1; multi-label: one sigmoid
        per class), or the predicted value (regression: one column)."""
        return self.task.scores(self.logits(texts))

    def predict(self, texts: list[str] | str, top_k: int = 1) -> list[dict[str, Any]]:
        """One dict per text. Single-label: ``label``, ``score``, ``probabilities`` per class and ``top_k``.
        Multi-label: ``labels`` (every class at or above its threshold), ``probabilities``, ``top_k``.
        Regression: ``value`` (and ``label``, the target's name)."""
        return self.task.results(self.logits([texts] if isinstance(texts, str) else texts), self.class_names, top_k)


BACKENDS = ("torch", "onnx", "onnx-int8")


def load(
    folder: str | Path,
    device: str | torch.device | None = None,
    merge: bool = True,
    batch_size: int = 64,
    precision: str = "auto",
    base: str | None = None,
    backend: str = "torch",
) -> Classifier | OnnxClassifier:
    """Load a trained adaptext model directory for inference (LoRA merged into the weights).

    ``backend="onnx"`` (or ``"onnx-int8"``) runs the file written by ``adaptext export`` with ONNX
    Runtime on the CPU instead; the result has the same ``logits``/``predict_proba``/``predict``.
    """
    if backend not in BACKENDS:
        raise AdaptextError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend != "torch":
        # lazy: the ONNX backend (onnxruntime) only when asked for
        from adaptext.export import load_onnx

        if base is not None:
            raise AdaptextError("--base applies to --backend torch only; the ONNX export has its base model built in")
        if precision not in ("auto", "fp32"):
            raise AdaptextError(f"--precision {precision} applies to --backend torch only; ONNX runs fp32 or int8")
        if device is not None and torch.device(device).type != "cpu":
            raise AdaptextError(f"--backend {backend} runs on the CPU (ONNX Runtime); use --backend torch for {device}")
        return load_onnx(folder, quantized=backend == "onnx-int8", batch_size=batch_size)
    target = torch.device(device) if device is not None else pick_device()
    return Classifier(load_model(folder, target, merge=merge, base=base), batch_size, precision)
