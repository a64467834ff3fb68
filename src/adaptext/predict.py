"""Inference on a trained model: merged LoRA weights, length-sorted batches, probabilities, top-k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptext.artifacts import LoadedModel, load_model
from adaptext.errors import AdaptextError
from adaptext.metrics import softmax
from adaptext.train import pick_device, predict_logits, resolve_precision, tokenize


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

    def logits(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        encoded = tokenize(self.loaded.tokenizer, texts, self.loaded.max_length, self.loaded.long_text)
        pad_id = self.loaded.tokenizer.pad_token_id
        return predict_logits(self.loaded.model, encoded, pad_id, self.batch_size, self.precision, self.device)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts))

    def predict(self, texts: list[str] | str, top_k: int = 1) -> list[dict[str, Any]]:
        """One dict per text: ``label``, ``score``, ``probabilities`` per class and ``top_k``."""
        if isinstance(texts, str):
            texts = [texts]
        probs = self.predict_proba(texts)
        k = max(1, min(top_k, len(self.class_names)))
        results = []
        for row in probs:
            order = np.argsort(-row)[:k]
            results.append(
                {
                    "label": self.class_names[order[0]],
                    "score": float(row[order[0]]),
                    "top_k": [{"label": self.class_names[i], "score": float(row[i])} for i in order],
                    "probabilities": {name: float(p) for name, p in zip(self.class_names, row)},
                }
            )
        return results


def check_texts(texts: list[Any]) -> list[str]:
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise AdaptextError(f"text #{i} is {type(text).__name__}, not a string; pass strings to predict")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise AdaptextError(f"text #{i} holds bytes that are not valid UTF-8; re-encode it as UTF-8") from None
        out.append(text)
    return out


def load(
    folder: str | Path,
    device: str | torch.device | None = None,
    merge: bool = True,
    batch_size: int = 64,
    precision: str = "auto",
    base: str | None = None,
) -> Classifier:
    """Load a trained adaptext model directory for inference (LoRA merged into the weights)."""
    target = torch.device(device) if device is not None else pick_device()
    return Classifier(load_model(folder, target, merge=merge, base=base), batch_size, precision)
