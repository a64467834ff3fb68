"""Cheap CPU dropout masks (adaptext.dropout): torch's distribution, gradient and attention math."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adaptext.dropout import LEVELS, CpuDropout, cpu_dropout, masked_dropout, math_attention


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_p_of_every_lane_and_keep_the_mean(p):
    torch.manual_seed(0)
    n = 1 << 20
    out = masked_dropout(torch.ones(n), p)
    used = round(p * LEVELS) / LEVELS  # p to 1/65,536
    assert out.unique().tolist() == [0.0, pytest.approx(1 / (1 - used))]
    sigma = (p * (1 - p) / (n // 4)) ** 0.5
    # Four masks come from each 64-bit draw: each of the four lanes drops p (a plain random_() would
    # leave the top bit 0 and every fourth lane would keep everything).
    for lane in (out.view(-1, 4) == 0).float().mean(0).tolist():
        assert abs(lane - p) < 5 * sigma, lane
    assert out.mean().item() == pytest.approx(1.0, abs=10 * sigma / (1 - p))


def test_the_gradient_goes_through_the_same_mask():
    torch.manual_seed(1)
    x = torch.ones(4, 33, 16, requires_grad=True)
    grad = torch.randn(4, 33, 16)
    out = masked_dropout(x, 0.3)
    out.backward(grad)
    assert torch.equal(x.grad, grad * out.detach())  # out is the mask's multiplier (x is ones)
    assert 0.2 < (out == 0).float().mean().item() < 0.4


def test_seeded_runs_repeat_and_other_cases_keep_torchs_path():
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    first = masked_dropout(x, 0.2)
    torch.manual_seed(5)
    assert torch.equal(first, masked_dropout(x, 0.2))
    assert torch.equal(masked_dropout(x, 0.2, training=False), x)
    assert torch.equal(masked_dropout(x, 1.0), torch.zeros_like(x))  # torch's own p=1
    layer = nn.Dropout(0.4)
    layer.__class__ = CpuDropout
    layer.eval()
    assert torch.equal(layer(x), x)
    ints = torch.arange(10)
    assert torch.equal(CpuDropout(0.0)(ints), ints)


def _qkv(batch=2, heads=3, length=7, dim=8, grad=False):
    torch.manual_seed(2)
    return [torch.randn(batch, heads, length, dim, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_attention_math_matches_transformers_sdpa(mask_kind):
    q, k, v = _qkv(grad=True)
    module = nn.Module()
    module.is_causal = mask_kind == "causal"
    mask = None
    if mask_kind in ("bool", "float"):
        keep = torch.ones(2, 1, 7, 7, dtype=torch.bool)
        keep[0, :, :, 5:] = False  # the first text is 5 tokens long
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e9)
    ours = math_attention(q, k, v, mask, mask_kind == "causal", 8**-0.5, 0.0)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=8**-0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_dropout_is_unbiased():
    q, k, v = _qkv(batch=1, heads=2, length=5, dim=4)
    exact = math_attention(q, k, v, None, False, 0.5, 0.0)
    torch.manual_seed(3)
    mean = sum(math_attention(q, k, v, None, False, 0.5, 0.5) for _ in range(4000)) / 4000
    assert not torch.equal(math_attention(q, k, v, None, False, 0.5, 0.5), exact)
    torch.testing.assert_close(mean, exact, rtol=0, atol=0.06)


def _tiny_bert():
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(4)
    return BertForSequenceClassification(config)


def test_the_context_routes_training_dropout_and_restores_everything():
    model = _tiny_bert()
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    model.eval()
    before = model(input_ids=ids, attention_mask=mask).logits
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    dropouts = sum(type(m) is nn.Dropout for m in model.modules())
    with cpu_dropout(model) as swapped:
        assert swapped == dropouts > 0
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not original
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)
        model.train()
        torch.manual_seed(6)
        first = model(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(6)
        again = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(first, again) and not torch.allclose(first, before)
        first.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    assert sum(type(m) is nn.Dropout for m in model.modules()) == dropouts
    with pytest.raises(RuntimeError, match="boom"), cpu_dropout(model):
        raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    assert not any(isinstance(m, CpuDropout) for m in model.modules())
    with cpu_dropout(model, enabled=False) as swapped:
        assert swapped == 0 and ALL_ATTENTION_FUNCTIONS["sdpa"] is original


def test_bf16_autocast_training_takes_the_cheap_path_too(monkeypatch):
    # --precision auto picks bf16 on CPUs with AMX: the masks, the attention math and the backward
    # must work under CPU autocast as well.
    import adaptext.dropout

    calls = []
    real = adaptext.dropout.math_attention
    monkeypatch.setattr(adaptext.dropout, "math_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    x = torch.ones(4096, dtype=torch.bfloat16)
    out = masked_dropout(x, 0.25)
    assert out.dtype == torch.bfloat16
    assert out.unique().tolist() == [0.0, pytest.approx(4 / 3, rel=1e-2)]
    model = _tiny_bert()
    model.train()
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 4:] = 0
    with cpu_dropout(model), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits.float()).all()
    assert calls == [torch.bfloat16] * 2  # both layers' attention went through the cheap masks
    logits.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
