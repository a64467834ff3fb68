"""Adapters held for serving: one copy of each base model, many adapters on it.

LoRA, rsLoRA and head-only adapters of one base share it (adaptext.serve.shared_base: one forward pass
for a batch that mixes them). Methods peft cannot mix in one batch (DoRA, IA3, LoHa, LoKr, VeRA,
AdaLoRA, prompt methods, BitFit, full fine-tuning) are each loaded as their own merged model
(:class:`Standalone`) and run in their own batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptext.artifacts import (
    HEAD_FILE,
    SavedSettings,
    base_source,
    class_names_of,
    load_model,
    read_labels,
    read_meta,
)
from adaptext.batching import pick_device, predict_logits
from adaptext.errors import AdaptextError
from adaptext.models import ModelSource, load_tokenizer
from adaptext.precision import resolve as resolve_precision
from adaptext.serve.shared_base import ADAPTER_FILE, SharedBase
from adaptext.windows import TextRows

SHAREABLE = ("lora", "rslora", "head")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterNotFound(AdaptextError):
    """No adapter of that name is loaded (HTTP 404)."""


class PathRefused(AdaptextError):
    """An adapter path outside the directories the server was started with (HTTP 403)."""


class AdapterExists(AdaptextError):
    """An adapter of that name is already loaded (HTTP 409)."""


@dataclass
class Adapter(SavedSettings):
    """One served adapter: where it came from, its labels, how to tokenise for it, and what runs it."""

    name: str
    folder: Path
    meta: dict[str, Any]
    class_names: list[str]
    tokenizer: Any
    runner: SharedBase | Standalone
    metrics: dict[str, Any] = field(default_factory=dict)

    def encode(self, texts: list[str]) -> TextRows:
        """The model rows of ``texts`` as at training time: one per text, or one per sliding window."""
        return self.windowing.encode(self.tokenizer, texts)

    def scores(self, rows: TextRows, row_logits: np.ndarray) -> np.ndarray:
        """One row of probabilities (or values) per text, from the logits of all of its rows: each text's
        windows pooled before softmax or sigmoid, as ``adaptext predict`` does."""
        return self.task.scores(self.windowing.pool_logits(row_logits, rows))

    def describe(self) -> dict[str, Any]:
        base = self.meta["base_model"]
        test = self.metrics.get("test") or self.metrics.get("validation") or {}
        return {
            "name": self.name,
            "base": base.get("hub_id") or base["name"],
            "method": self.meta["method"],
            "labels": self.class_names,
            "task": self.task.kind,
            "max_length": self.max_length,
            "long_text": self.long_text,
            "shared_base": isinstance(self.runner, SharedBase),
            # What this server computes in, and what the training-time metrics below were computed in.
            "precision": self.runner.precision,
            "metrics": {k: v for k, v in test.items() if isinstance(v, (int, float))},
            "metrics_precision": test.get("precision") or self.metrics.get("train", {}).get("precision"),
        }


class Standalone:
    """An adapter whose method peft cannot mix in a batch: its own merged model."""

    def __init__(self, folder: Path, device: torch.device, precision: str):
        self.loaded = load_model(folder, device, merge=True)
        self.device = device
        self.precision = precision

    def logits(
        self, ids: list[list[int]], batch_size: int, on_forward: Callable[[int], None] | None = None
    ) -> np.ndarray:
        pad = self.loaded.tokenizer.pad_token_id
        # predict_logits calls ``feed`` with each batch's rows just before its forward pass.
        feed = (lambda batch, _width: on_forward(len(batch))) if on_forward is not None else None
        return predict_logits(self.loaded.model, ids, pad, batch_size, self.precision, self.device, feed)


def check_weights_files(folder: Path) -> None:
    """Only safetensors are ever loaded: a directory carrying pickled weights is refused outright."""
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdaptextError(
            f"{folder} holds pickled weights ({pickled[0]}); adaptext serve loads safetensors only — remove them"
        )


class Registry:
    """The adapters a server holds, by name, on as few base models as their methods allow.

    Not thread-safe: the server calls it from one worker thread only.
    """

    def __init__(
        self,
        roots: list[Path],
        device: str | torch.device | None = None,
        precision: str = "auto",
        batch_size: int = 64,
    ):
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        self.device = torch.device(device) if device is not None else pick_device()
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size  # rows per forward pass
        self.adapters: dict[str, Adapter] = {}
        self.bases: dict[str, SharedBase] = {}
        self.on_forward: Callable[[int], None] | None = None  # called with the rows of every forward pass

    def resolve(self, path: str | Path) -> Path:
        """An adapter directory inside one of the roots (absolute, or relative to a root)."""
        raw = Path(path).expanduser()
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.roots] + [Path.cwd() / raw]
        for candidate in candidates:
            real = candidate.resolve()
            if not any(real == root or root in real.parents for root in self.roots):
                continue
            if real.is_dir():
                return real
        if any(c.resolve().is_dir() for c in candidates):
            raise PathRefused(
                f"adapter path {str(path)!r} is outside the directories this server may load from "
                f"({', '.join(map(str, self.roots))}); start adaptext serve with --allow-dir for it"
            )
        raise AdaptextError(f"adapter path {str(path)!r} not found in {', '.join(map(str, self.roots))}")

    def load(self, path: str | Path, name: str | None = None) -> Adapter:
        folder = self.resolve(path)
        name = name or folder.name
        if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
            raise AdaptextError(f"adapter name {name!r}: use 1-100 letters, digits, '-', '_' or '.'")
        if name in self.adapters:
            raise AdapterExists(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        meta = read_meta(folder)
        check_weights_files(folder)
        labels = read_labels(folder)
        class_names = class_names_of(labels)
        method = meta["method"]
        runner: SharedBase | Standalone
        if method in SHAREABLE:
            weights = folder / (HEAD_FILE if method == "head" else ADAPTER_FILE)
            if not weights.is_file():
                raise AdaptextError(f"{folder} has no {weights.name}; only safetensors weights are loaded")
            source = base_source(meta)
            pooling = meta["pooling"]  # adapters share a base only if they pool alike
            key = f"{os.path.realpath(source.path)}|pad={labels['pad_token_id']}|pooling={pooling}"
            runner = self.bases.get(key) or SharedBase(
                source, labels["pad_token_id"], self.device, self.precision, pooling
            )
            runner.add(name, folder, meta, len(class_names))
            self.bases[key] = runner
        else:
            runner = Standalone(folder, self.device, self.precision)
        tokenizer = load_tokenizer(ModelSource(str(folder), str(folder), None))
        metrics = {}
        if (folder / "metrics.json").is_file():
            import json

            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        adapter = Adapter(name, folder, meta, class_names, tokenizer, runner, metrics)
        self.adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        adapter = self.get(name)
        del self.adapters[name]
        if isinstance(adapter.runner, SharedBase):
            adapter.runner.remove(name)
            if not adapter.runner.names:  # the last adapter on that base: free the base too
                self.bases = {k: b for k, b in self.bases.items() if b is not adapter.runner}

    def get(self, name: str) -> Adapter:
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterNotFound(f"no adapter named {name!r} is loaded (loaded: {known})")
        return self.adapters[name]

    def encode(self, name: str, texts: list[str]) -> tuple[Adapter, TextRows]:
        """``texts`` as the model rows of the adapter ``name``: one per text, or one per sliding window."""
        adapter = self.get(name)
        return adapter, adapter.encode(texts)

    def row_logits(self, parts: list[tuple[Adapter, list[list[int]]]]) -> list[np.ndarray | AdaptextError]:
        """The logits of each (adapter, rows' token ids) part, one row each; rows of one base run in shared
        batches of at most ``batch_size``. A part whose adapter was unloaded since :meth:`encode` gets its
        error in place of a result."""
        results: list[np.ndarray | AdaptextError] = [np.zeros(0)] * len(parts)
        shared: dict[int, list[tuple[int, str, list[int]]]] = {}
        for p, (adapter, ids) in enumerate(parts):
            if self.adapters.get(adapter.name) is not adapter:
                results[p] = AdapterNotFound(f"adapter {adapter.name!r} was unloaded while the request waited")
            elif not ids:
                results[p] = np.zeros((0, len(adapter.class_names)), dtype=np.float32)
            elif isinstance(adapter.runner, SharedBase):
                shared.setdefault(id(adapter.runner), []).extend((p, adapter.name, row) for row in ids)
            else:
                results[p] = adapter.runner.logits(ids, self.batch_size, self.on_forward)
        runners = {id(a.runner): a.runner for a in self.adapters.values()}
        for key, shared_rows in shared.items():
            logits = runners[key].logits(
                [(name, ids) for _, name, ids in shared_rows], self.batch_size, self.on_forward
            )
            per_part: dict[int, list[np.ndarray]] = {}
            for (p, _, _), row in zip(shared_rows, logits):
                per_part.setdefault(p, []).append(row)  # in each part's row order
            for p, row_list in per_part.items():
                results[p] = np.stack(row_list)
        return results

    def probabilities(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray | AdaptextError]:
        """Class probabilities (or regression values: ``Task.scores``) for each (adapter, texts) request, all
        rows in one go (serve's batcher calls :meth:`encode` and :meth:`row_logits` itself, to bound the rows
        of each call).

        A text cut into sliding windows is several rows (of the shared batches, too); its rows' logits are
        pooled back into one before softmax or sigmoid, as ``adaptext predict`` does. A request naming an
        adapter that is not loaded gets its error in place of a result.
        """
        results: list[np.ndarray | AdaptextError] = [np.zeros(0)] * len(requests)
        encoded: dict[int, tuple[Adapter, TextRows]] = {}
        for r, (name, texts) in enumerate(requests):
            try:
                encoded[r] = self.encode(name, texts)
            except AdaptextError as exc:
                results[r] = exc
        logits = self.row_logits([(adapter, rows.ids) for adapter, rows in encoded.values()])
        for (r, (adapter, rows)), row_logits in zip(encoded.items(), logits):
            results[r] = row_logits if isinstance(row_logits, AdaptextError) else adapter.scores(rows, row_logits)
        return results

    def describe(self) -> list[dict[str, Any]]:
        return [self.adapters[n].describe() for n in sorted(self.adapters)]

    def describe_bases(self) -> list[dict[str, Any]]:
        """The base models in memory, once each, and the adapters sharing each one."""
        out = []
        for base in self.bases.values():
            params = sum(p.numel() for n, p in base.model.named_parameters() if ".lora_" not in n)
            out.append(
                {"model": base.source.name, "adapters": base.names, "parameters": params, "precision": base.precision}
            )
        return out
