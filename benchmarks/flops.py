"""FLOP counting and a measured matmul peak, for the MFU every benchmark prints.

Formula (per sequence of S real tokens, per transformer layer with hidden size d and FFN size f):

    forward = 2 * (4*d*d + 2*d*f) * S      # the Q, K, V, O and two FFN matmuls: 2 FLOPs per weight per token
            + 4 * d * S * S                # attention scores (Q K^T) and the weighted sum (A V)

Training multiplies a layer's forward by 3 when its weights are trained (forward, input gradients,
weight gradients) and by 2 when they are frozen but something below them trains (LoRA on every
layer: the frozen weights still pass gradients down). Layers below the lowest trained one cost one
forward (or nothing on epochs that read them from adaptext's feature cache). Embedding lookups,
LayerNorms, the head and the tiny LoRA matrices are left out (< 1% for these models). Only real
(non-padding) tokens count, so padding shows up as lost utilisation: MFU = counted FLOPs / seconds /
peak, where the peak is a large matmul timed on the same machine in the same run, in the precision the
pipeline ran in: a bf16 matmul runs at a different rate from an fp32 one (about 2x on an AMD EPYC with
AVX512-BF16, about 7x on AMX, about 16x on an H100), so every run measures each precision's peak
(``matmul_peaks``) and divides each pipeline's FLOP/s by the peak of its own precision (``mfu``). On a
CPU the fp32 peak is the faster of torch's and ONNX Runtime's matmul (torch's ran at half the other's
on an AMD EPYC).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from adaptext.precision import DTYPES  # precision name -> torch dtype, as adaptext's --precision names them


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        """Read the sizes from a transformers config (BERT-style, DistilBERT and GPT-2 names)."""
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or config.n_embd
        ffn = (
            getattr(config, "intermediate_size", None)
            or getattr(config, "hidden_dim", None)
            or getattr(config, "n_inner", None)
            or 4 * hidden
        )
        return cls(int(layers), int(hidden), int(ffn))

    def layer_forward(self, seq_lens: list[int] | Any) -> float:
        """Forward FLOPs of one layer summed over sequences of the given real lengths."""
        total = 0.0
        weights = 4 * self.hidden * self.hidden + 2 * self.hidden * self.ffn
        for s in seq_lens:
            total += 2.0 * weights * s + 4.0 * self.hidden * s * s
        return total


def train_flops(shape: Shape, seq_lens: list[int], trained_from: int = 0, weights_trained: bool = False) -> float:
    """FLOPs of one training pass over sequences: layers < trained_from run forward only."""
    per_layer = shape.layer_forward(seq_lens)
    below = min(trained_from, shape.layers)
    above = shape.layers - below
    return per_layer * (below + above * (3 if weights_trained else 2))


def run_flops(
    shape: Shape, train_lens: list[int], epochs: float, method: str, cached_layers: int = 0, cache_lens: list[int] = ()
) -> float:
    """FLOPs a training run performs: LoRA-style 2x, full 3x, head-only forward-only; cached layers once."""
    layers_above = shape.layers - cached_layers
    per_layer_epoch = shape.layer_forward(train_lens)
    factor = {"head": 1, "full": 3}.get(method, 2)
    if method == "head" and cached_layers:
        factor = 0  # every layer was cached: steps run only the classifier
    cached = shape.layer_forward(cache_lens) * cached_layers
    return cached + per_layer_epoch * layers_above * factor * epochs


def forward_flops(shape: Shape, seq_lens: list[int], layers: int | None = None) -> float:
    return shape.layer_forward(seq_lens) * (shape.layers if layers is None else layers)


def matmul_peak(
    dtype: torch.dtype = torch.float32, device: str = "cpu", seconds: float = 2.0, n: int | None = None
) -> float:
    """Sustained FLOP/s of a square matmul (size chosen per device) on this machine right now.

    bf16/fp16 inputs are multiplied as such: what the pipelines' autocast matmuls run once their
    inputs are cast (the cast itself is the pipeline's cost, not the chip's peak).
    """
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(device)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - started))
    return best


def matmul_peaks(device: str = "cpu", seconds: float = 2.0, n: int | None = None) -> dict[str, float]:
    """The matmul peak of every precision a pipeline may run in on this device, measured one after the
    other: fp32 and bf16, plus fp16 on CUDA (adaptext's ``auto`` there when bf16 is missing)."""
    names = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    peaks = {name: matmul_peak(DTYPES[name], device, seconds, n) for name in names}
    if device == "cpu":
        # torch's fp32 GEMM is not the fastest this CPU can do: on an AMD EPYC (Zen 5) it ran at 190
        # GFLOP/s where ONNX Runtime's ran at 390, and the ONNX rows then showed an MFU above 100%. The
        # peak is the chip's best measured rate, whichever library reaches it.
        peaks["fp32"] = max(peaks["fp32"], onnxruntime_matmul_peak(seconds, n or 1024))
    return peaks


def onnxruntime_matmul_peak(seconds: float = 2.0, n: int = 1024) -> float:
    """Sustained fp32 FLOP/s of ONNX Runtime's CPU matmul (0 where onnxruntime is not installed)."""
    try:
        import numpy as np
        import onnxruntime
        from onnx import TensorProto, helper
    except ImportError:
        return 0.0
    square = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", square[:2], square[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {name: np.random.randn(n, n).astype(np.float32) for name in "ab"}
    for _ in range(3):
        session.run(None, feed)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(None, feed)
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def best_peaks(*measurements: dict[str, float]) -> dict[str, float]:
    """Per precision, the highest of several ``matmul_peaks`` measurements: other processes on a shared
    machine can only slow a measurement down, never speed it up, so the best one is the nearest to the
    chip's rate (an MFU against a depressed peak would overstate utilisation)."""
    return {name: max(m[name] for m in measurements) for name in measurements[0]}


def describe_peaks(peaks: dict[str, float], unit: float = 1e9, unit_name: str = "GFLOP/s") -> str:
    """``fp32 138 GFLOP/s, bf16 410 GFLOP/s`` for headers and progress lines."""
    return ", ".join(f"{name} {flops / unit:,.0f} {unit_name}" for name, flops in peaks.items())


def mfu(flops: float, seconds: float, precision: str, peaks: dict[str, float]) -> float | None:
    """Model FLOPs utilisation against the measured peak of the precision the run used; None for int8
    (its matmuls run on integer units whose peak is not measured)."""
    if precision == "int8":
        return None
    if precision not in peaks:
        raise KeyError(f"no {precision} matmul peak was measured (have {', '.join(peaks)})")
    return flops / seconds / peaks[precision]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
