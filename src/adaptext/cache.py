"""Frozen-prefix feature cache: run the frozen lower layers once, then train on their outputs.

When nothing below layer ``m`` trains (head-only training, LoRA on the top layers only, full
fine-tuning of the top layers), every epoch recomputes the same outputs of layers ``0..m-1``.
Here those outputs are computed once per example (eval mode, no gradients, length-sorted batches,
only up to layer ``m-1``) and stored unpadded; training then swaps the embeddings for a module that
hands back the cached states and the frozen layers for pass-throughs, so each step runs only the
top of the network. Real token positions get exactly the states the full model computes (padding
is masked out of attention), so logits match the uncached model in eval mode. One difference is
inherent: the cached layers ran without dropout.

The cache lives in memory, or in a memory-mapped temporary file when it is larger than
``ADAPTEXT_CACHE_MEMORY_MB`` (default 2048).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptext.batching import collate, inference_batches
from adaptext.models import PROMPT_METHODS
from adaptext.precision import autocast
from adaptext.stack import Stack, find_stack


def frozen_depth(model: nn.Module, stack: Stack) -> int:
    """How many blocks from the bottom hold no trainable parameter (0 if the embeddings train)."""
    if any(p.requires_grad for p in getattr(stack.owner, stack.attr).parameters()):
        return 0
    for index, layer in enumerate(stack.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(stack.layers)


def plan(model: nn.Module, method: str, setting: str) -> tuple[FeatureCache | None, str]:
    """A cache for this model and method if it would skip work, and a line saying why or why not."""
    if setting == "off":
        return None, "off (--feature-cache off)"
    if method in PROMPT_METHODS:
        return None, "off (virtual tokens enter below the first layer)"
    stack = find_stack(model)
    if stack is None:
        return None, f"off ({model.config.model_type} keeps no separate embeddings module)"
    depth = frozen_depth(model, stack)
    if depth == 0:
        return None, "off (the lowest layer trains)"
    return FeatureCache(stack, depth), f"layers 0-{depth - 1} of {len(stack.layers)} run once and are cached"


class _Stash(nn.Module):
    """Stands in for the embeddings: returns the cached states of the current batch."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value


class _Skip(nn.Module):
    """Stands in for a cached block: passes the hidden states through, shaped like the block's output."""

    def __init__(self, tuple_len: int, block: nn.Module) -> None:
        super().__init__()
        self.tuple_len = tuple_len  # 0: the block returns a tensor; n: a tuple of n (hidden states first)
        # Models read plain attributes of their blocks (ModernBERT: attention_type): keep them visible.
        for key, value in vars(block).items():
            if not key.startswith("_") and key != "training" and isinstance(value, (str, int, float, bool)):
                setattr(self, key, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else next(kwargs[k] for k in ("hidden_states", "hidden_state", "x") if k in kwargs)
        return (hidden,) + (None,) * (self.tuple_len - 1) if self.tuple_len else hidden


class _Stop(Exception):
    pass


@dataclass
class _Split:
    flat: torch.Tensor  # [sum of lengths, hidden]
    offsets: list[int]
    lengths: list[int]


@dataclass
class FeatureCache:
    stack: Stack
    depth: int
    splits: dict[str, _Split] = field(default_factory=dict)
    tuple_len: int = 0
    nbytes: int = 0
    memory_mapped: bool = False
    _tmp: Any = None
    _stash: _Stash | None = None

    def build(
        self, model: nn.Module, name: str, encoded: list[list[int]], pad_id: int, batch_size: int, precision: str
    ) -> None:
        """Run the frozen prefix over ``encoded`` once and keep every example's real-token states."""
        device = next(model.parameters()).device
        lengths = [len(x) for x in encoded]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        hidden = _hidden_size(model)
        flat = self._storage(name, sum(lengths), hidden)
        captured: dict[str, Any] = {}

        def grab(_module, _inputs, output):
            captured["out"] = output
            raise _Stop

        hook = self.stack.layers[self.depth - 1].register_forward_hook(grab)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in inference_batches(lengths, batch_size, device):
                    inputs = {k: v.to(device) for k, v in collate([encoded[i] for i in batch], pad_id).items()}
                    with contextlib.suppress(_Stop), autocast(precision, device):
                        model(**inputs)
                    out = captured.pop("out")
                    self.tuple_len = len(out) if isinstance(out, tuple) else 0
                    states = (out[0] if self.tuple_len else out).float().cpu()
                    for row, i in enumerate(batch):
                        flat[offsets[i] : offsets[i] + lengths[i]] = states[row, : lengths[i]]
        finally:
            hook.remove()
            model.train(was_training)
        self.splits[name] = _Split(flat, offsets, lengths)

    def _storage(self, name: str, rows: int, hidden: int) -> torch.Tensor:
        nbytes = rows * hidden * 4
        self.nbytes += nbytes
        limit = int(os.environ.get("ADAPTEXT_CACHE_MEMORY_MB", "2048")) * 2**20
        if self.nbytes <= limit:
            return torch.empty((rows, hidden), dtype=torch.float32)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="adaptext-features-")
        self.memory_mapped = True
        path = os.path.join(self._tmp.name, f"{name}.f32")
        return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, hidden)))

    def feed(self, name: str, batch: list[int], width: int, device: torch.device) -> None:
        """Hand the cached states of ``batch`` (padded with zeros to ``width``) to the next forward pass."""
        split = self.splits[name]
        states = torch.zeros((len(batch), width, split.flat.shape[1]), dtype=torch.float32)
        for row, i in enumerate(batch):
            start = split.offsets[i]
            states[row, : split.lengths[i]] = split.flat[start : start + split.lengths[i]]
        self._stash.value = states.to(device, non_blocking=True)

    @contextlib.contextmanager
    def attached(self) -> Iterator[FeatureCache]:
        """Swap the embeddings and the cached blocks for stand-ins; put them back on exit."""
        owner, attr, layers = self.stack.owner, self.stack.attr, self.stack.layers
        embeddings = getattr(owner, attr)
        skipped = [layers[i] for i in range(self.depth)]
        self._stash = _Stash()
        setattr(owner, attr, self._stash)
        for i in range(self.depth):
            layers[i] = _Skip(self.tuple_len, skipped[i])
        try:
            yield self
        finally:
            setattr(owner, attr, embeddings)
            for i, layer in enumerate(skipped):
                layers[i] = layer
            self._stash = None

    def close(self) -> None:
        self.splits.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "dim", None) or config.n_embd)
