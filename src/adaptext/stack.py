"""Where a transformer keeps its embeddings and its blocks, and which blocks a run adapts.

Shared by model building (LoRA's layers_to_transform, the top layers) and the feature cache (which
runs the frozen blocks below the adapted ones once): a small module both import, so neither imports
the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptext.config import AUTO_TOP_METHODS, TrainConfig
from adaptext.errors import AdaptextError


@dataclass
class Stack:
    """Where a model keeps its embeddings module and its list of transformer blocks."""

    owner: nn.Module  # the module holding the embeddings attribute
    attr: str  # "embeddings" or "embed_tokens"
    layers: nn.ModuleList


def find_stack(model: nn.Module) -> Stack | None:
    """The embeddings + blocks of BERT-style encoders and Llama-style decoders; None for others (GPT-2)."""
    for _, module in model.named_modules():
        for attr in ("embeddings", "embed_tokens"):
            if isinstance(getattr(module, attr, None), nn.Module):
                lists = [
                    m
                    for n, m in module.named_modules()
                    if isinstance(m, nn.ModuleList) and len(m) and n.rsplit(".", 1)[-1] in ("layer", "layers")
                ]
                if lists:
                    return Stack(module, attr, max(lists, key=len))
    return None


def num_layers(model: nn.Module) -> int:
    stack = find_stack(model)
    if stack is not None:
        return len(stack.layers)
    config = model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    return int(count or config.n_layer)


def top_layer_indices(model: nn.Module, top: int) -> list[int]:
    total = num_layers(model)
    if top > total:
        raise AdaptextError(f"--top-layers {top} but the model has {total} layers; pass at most {total}")
    return list(range(total - top, total))


def adapted_layers(model: nn.Module, cfg: TrainConfig) -> list[int] | None:
    """The layer indices the method adapts (None = every layer): --layers, --top-layers, or the default."""
    if cfg.layers:
        return list(cfg.layers)
    top = cfg.top_layers
    if top is None and cfg.method in AUTO_TOP_METHODS:
        top = -(-num_layers(model) // 3)  # the top third, rounded up
    if not top or top == num_layers(model):
        return None
    return top_layer_indices(model, top)
