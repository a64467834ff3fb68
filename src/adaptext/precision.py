"""Numeric precision: what ``--precision auto`` means on this machine, autocast, and what "equal" means.

``auto`` is bf16 on CUDA GPUs that support it (fp16 on older ones) and on CPUs with bf16 instructions
(AMX or AVX512-BF16), where bf16 matmuls run several times faster than fp32; fp32 elsewhere, where
bf16 is emulated and slow. ``ADAPTEXT_PRECISION=fp32|bf16|fp16`` decides what ``auto`` resolves to for
a whole run (every command, subprocess and test of it); an explicit ``--precision`` still wins.

Every result records the precision that produced it (metrics.json, adaptext.json, evaluate and
predict outputs, the model card, serve's /v1/adapters). Two evaluations of one model agree:

- in fp32 to float rounding (the tests hold logits to 1e-4, probabilities to 2e-5);
- in bf16 (fp16) within ``logit_bound``: bf16 keeps 8 significant bits (eps = 2**-7), and an
  evaluation's roundings (weights, activations, the head's output) add up to a few eps of the
  logits' scale away from the exact (fp32) logits: measured up to 1.2 eps for a tiny BERT with LoRA
  merged into its bf16 weights, and 0.9 eps unmerged (torch's bf16 on an AVX2 CPU). ``logit_bound`` allows 2 eps per evaluation, so
  two evaluations that round differently (another batch shape, LoRA merged or not, one of them in
  fp32) agree within 4 eps of the scale (the same pair measured 2.2 eps apart). The scale is the largest logit, but at least ``SCALE_FLOOR``
  = 1: a logit is a dot product of the head's weights with normalised activations of order 1, and
  the rounding of those activations, not the logit's own size, is what moves a small one.
  Differences in deeper layers are damped by each layer's normalisation. From the logit bound follow
  the rest: a softmax probability moves at most half as much, a label changes only where the top
  two logits are closer than twice the bound, and a mean cross-entropy moves at most twice the bound.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from adaptext.config import PRECISIONS
from adaptext.errors import AdaptextError

ENV = "ADAPTEXT_PRECISION"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Machine epsilon (the spacing of numbers just above 1) of each precision.
EPS = {name: torch.finfo(dtype).eps for name, dtype in DTYPES.items()}
SCALE_FLOOR = 1.0
FP32_LOGIT_BOUND = 1e-4


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls beat fp32 (elsewhere they crawl)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def forced() -> str | None:
    """The precision ``ADAPTEXT_PRECISION`` makes ``auto`` mean, or None when it is unset (or ``auto``)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in DTYPES:
        raise AdaptextError(f"{ENV}={value!r} is not one of fp32, bf16, fp16, auto; fix or unset it")
    return value


def resolve(requested: str, device: torch.device) -> str:
    """The precision a run computes in: ``requested`` unless it is ``auto`` (see the module doc)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise AdaptextError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
        return requested
    chosen = forced()
    if chosen is not None:
        return chosen
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def logit_bound(precision: str, reference: np.ndarray) -> float:
    """How far two evaluations' logits may differ in ``precision``, given one of them (see the module doc)."""
    if precision == "fp32":
        return FP32_LOGIT_BOUND
    scale = float(np.abs(reference).max()) if np.size(reference) else 0.0
    return 4 * EPS[precision] * max(scale, SCALE_FLOOR)


def decided_rows(logits: np.ndarray, bound: float) -> np.ndarray:
    """Rows whose label no difference within ``bound`` can change: the top two logits are more than
    twice the bound apart (multi-label and regression rows: every row)."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        return np.ones(len(logits), dtype=bool)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > 2 * bound
