"""Dropout on a CPU at a fraction of torch's cost: the same distribution, cheaper random numbers.

torch draws one random number per element for a dropout mask (``bernoulli_``), single-threaded.
While training MiniLM with LoRA on a 2-core CPU those draws were a fifth of the step's CPU time,
and dropout as a whole a third (30 AG News steps: 16.8 s with the model's dropout, 11.2 s with it
off). Here each 64-bit draw makes four 16-bit masks, kept where the draw is at least
``round(p * 65536)`` (p is used to 1/65,536: 0.1 drops 0.100006), and survivors are scaled by the
matching ``1 / (1 - p)``. The training math is
unchanged; only the random stream differs from torch's, and it still comes from torch's seeded
generator, so a run repeats exactly and a resumed one continues as it would have.

Inside ``cpu_dropout(model)`` every ``nn.Dropout`` of the model (hidden states, LoRA inputs, the
head) draws this way, and so does attention-probability dropout of the models that go through
transformers' ``sdpa`` attention (BERT, RoBERTa, DistilBERT, GPT-2, ModernBERT, Llama; MPNet and
DeBERTa-v2 apply their attention dropout as an ``nn.Dropout`` module): with dropout on, torch's CPU
attention falls back to its unfused math anyway, so the same math with a cheaper mask costs nothing
else. Evaluation, other devices and dtypes, and attention that needs more than plain masking (GQA,
position bias, soft-capping) keep torch's own path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

LEVELS = 1 << 16  # masks are 16-bit: p is used to 1/65,536


def draw(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, int, float]:
    """Random 16-bit integers for a dropout mask of ``shape`` (four out of every 64-bit draw of torch's
    generator), the cut (an element is kept where its draw is at least the cut: probability
    ``1 - p`` to 1/65,536) and the scale that keeps the expected value. Needs ``0 < p < 1``."""
    n = math.prod(shape)
    cut = round(p * LEVELS)
    # Over the full int64 range (from=-2**63, no upper bound) every one of the 64 bits is random;
    # a plain random_() leaves the top bit 0, which would bias every fourth mask.
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    return draws.view(torch.int16)[:n].view(shape), cut - LEVELS // 2, LEVELS / (LEVELS - cut)


def multiplier(draws: torch.Tensor, cut: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` where a draw is at least ``cut``, else 0, in ``dtype``. Built from the integers in
    float32 (exact) in three vectorised passes: multiplying by a boolean mask casts element by element
    and costs more than drawing it."""
    mult = draws.to(torch.float32).sub_(cut - 1).clamp_(0, 1).mul_(scale)
    return mult if dtype == torch.float32 else mult.to(dtype)


class _Masked(torch.autograd.Function):
    """``x`` times the mask's multiplier; keeps the 16-bit draws (not a float mask) for its backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, draws: torch.Tensor, cut: int, scale: float) -> torch.Tensor:
        ctx.save_for_backward(draws)
        ctx.cut, ctx.scale = cut, scale
        return x * multiplier(draws, cut, scale, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (draws,) = ctx.saved_tensors
        return grad * multiplier(draws, ctx.cut, ctx.scale, grad.dtype), None, None, None


def fast_path(x: torch.Tensor, p: float) -> bool:
    """Whether ``x`` takes the cheap mask: a CPU floating-point tensor and 0 < p < 1."""
    return 0 < p < 1 and x.device.type == "cpu" and x.is_floating_point()


def masked_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``nn.functional.dropout`` with the cheap mask on CPU floating-point tensors, torch's elsewhere."""
    if not training or not fast_path(x, p):
        return nn.functional.dropout(x, p, training)
    return _Masked.apply(x, *draw(x.shape, p))


class CpuDropout(nn.Dropout):
    """An ``nn.Dropout`` that draws its mask with ``keep_mask`` where it can (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not self.training or not fast_path(x, self.p):
            return super().forward(x)
        return masked_dropout(x, self.p)


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    p: float,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v over (batch, heads, length, dim), dropout ``p`` on the probabilities;
    returned as (batch, length, heads, dim), as transformers' attention functions return it. A boolean
    mask keeps where True; a float one is added (as SDPA takes them)."""
    scores = torch.matmul(query * scale, key.transpose(-2, -1))  # scaled on the smaller side
    floor = torch.finfo(scores.dtype).min  # masked, not -inf: a row with nothing to attend stays finite
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, floor)
        else:
            scores = scores + attention_mask
    elif causal:
        q_len, kv_len = query.shape[2], key.shape[2]
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, floor)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = masked_dropout(probs, p)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _attention_with_cpu_dropout(sdpa: Any) -> Any:
    """transformers' ``sdpa`` attention function, with cheap dropout masks where training on a CPU."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        q_len, kv_len = query.shape[2], key.shape[2]
        # sdpa_attention_forward's rule: causal only without a mask, from the call or else the module.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = q_len > 1 and attention_mask is None and causal
        plain = (
            module.training
            and fast_path(query, dropout)
            and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)
            and getattr(module, "num_key_value_groups", 1) == 1
            and not (causal and kv_len != q_len)
        )
        if not plain:
            return sdpa(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return math_attention(query, key, value, attention_mask, causal, scale, dropout), None

    return attention


@contextlib.contextmanager
def cpu_dropout(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within: the model's dropout draws cheap masks (see the module docstring); yields how many
    ``nn.Dropout`` modules changed. On exit the modules and the attention functions are as before.

    The attention change is process-wide while it lasts (transformers keeps one table of attention
    functions), but it only alters training-mode calls with dropout on a CPU: anything else, another
    model's inference included, reaches torch's SDPA as before."""
    if not enabled:
        yield 0
        return
    swapped = [m for m in model.modules() if type(m) is nn.Dropout]
    for module in swapped:
        module.__class__ = CpuDropout
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping  # noqa: SLF001
    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _attention_with_cpu_dropout(previous)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            module.__class__ = nn.Dropout
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
