"""How a text's token vectors become the one vector the classifier head reads.

transformers' sequence-classification classes pool the way their pre-training did: BERT's pooler on
the first token, RoBERTa/MPNet/DistilBERT heads on the first token, decoders on the last real token.
Sentence-transformers encoders (all-MiniLM-L6-v2, all-mpnet-base-v2, most embedding models) were
trained on the *mean* of the token vectors instead, and their first token carries much less: on
AG News with 8 examples per class, a logistic regression on MiniLM's frozen first-token vectors scores
0.69, on its mean 0.77 (TREC: 0.29 vs 0.59; docs/RESULTS.md). ``auto`` therefore keeps the pooling
the encoder was trained with, read from its sentence-transformers ``1_Pooling/config.json``.

Mean pooling is a forward hook on the backbone (``model.base_model``): the masked mean of the last
hidden states replaces what the head reads (BERT's pooler output, else position 0). The head class,
its weights, peft's saving and ONNX export (which traces hooks) are unchanged; only adaptext's loaders
know to install the hook, so a plain ``transformers`` load of a mean-pooled model pools its own way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptext.config import POOLINGS
from adaptext.errors import AdaptextError

HOOK_FLAG = "_adaptext_mean_pool"


def pools_last_token(model: nn.Module) -> bool:
    """Decoder classifiers in transformers (GPT-2, Llama, Mistral, Qwen, Phi...) score the last real token
    through a head named ``score``; encoders use ``classifier``."""
    return isinstance(getattr(model, "score", None), nn.Module)


def declared(path: str) -> str | None:
    """The pooling a sentence-transformers folder (or Hub repo) declares: "mean", "native" for CLS,
    None when it declares none (a plain transformers model)."""
    settings = _pooling_config(path)
    if settings is None:
        return None
    if settings.get("pooling_mode_mean_tokens"):
        return "mean"
    return "native" if settings.get("pooling_mode_cls_token") else None


def _pooling_config(path: str) -> dict[str, Any] | None:
    folder = Path(path)
    if folder.is_dir():
        candidate = folder / "1_Pooling" / "config.json"
        if not candidate.is_file():
            return None
        return json.loads(candidate.read_text(encoding="utf-8"))
    try:  # a Hub id: the file is small, and absent for plain transformers models
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "1_Pooling/config.json")).read_text(encoding="utf-8"))
    except Exception:  # offline, gated, or no such file: the model's own pooling
        return None


def resolve(requested: str, path: str, model: nn.Module) -> str:
    """``auto`` -> what the encoder declares (else native); ``mean`` is refused where it cannot apply."""
    if requested not in POOLINGS:
        raise AdaptextError(f"--pooling {requested!r}: choose from {', '.join(POOLINGS)}")
    decoder = pools_last_token(model)
    if requested == "auto":
        return "mean" if declared(path) == "mean" and not decoder else "native"
    if requested == "mean" and decoder:
        raise AdaptextError(
            f"--pooling mean is for encoders; {model.config.model_type} classifies from its last token: "
            "use --pooling native (or auto)"
        )
    return requested


def apply(model: nn.Module, pooling: str) -> None:
    """Install mean pooling on a transformers classifier (before peft wraps it); native is a no-op."""
    if pooling != "mean" or getattr(model, HOOK_FLAG, False):
        return
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise AdaptextError(f"--pooling mean needs a backbone module; {type(model).__name__} has none")
    backbone.register_forward_hook(_mean_hook, with_kwargs=True)
    setattr(model, HOOK_FLAG, True)


def of(model: nn.Module) -> str:
    """The pooling installed on a model (peft-wrapped or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "mean" if getattr(inner, HOOK_FLAG, False) else "native"


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of each row's real (mask 1) token vectors, accumulated in float32."""
    if mask is None:
        return hidden.float().mean(1).to(hidden.dtype)
    mask = mask[:, -hidden.shape[1] :]  # prefix tuning prepends its virtual tokens' columns to the mask
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = (hidden.float() * weights).sum(1)
    return (total / weights.sum(1).clamp(min=1.0)).to(hidden.dtype)


def _mean_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    hidden = output[0]
    mean = masked_mean(hidden, mask)
    if isinstance(output, dict) and output.get("pooler_output") is not None:
        output["pooler_output"] = mean  # BERT-style heads read the pooler output
    elif isinstance(output, dict):
        output["last_hidden_state"] = torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1)
    else:
        output = (torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1), *output[1:])
    return output
