"""ONNX export of a trained model, checked against torch, and the ONNX Runtime classifier that runs it.

``adaptext export --model DIR --format onnx [--quantize int8]`` writes (default folder ``DIR/onnx``)::

    model.onnx        logits = f(input_ids, attention_mask); LoRA merged; dynamic batch and sequence axes
    model.int8.onnx   the same with int8 weights (dynamic quantisation), with --quantize int8
    export.json       opset, quantisation, max |logit difference| from torch, file sizes, versions

The folder appears whole or not at all. ``adaptext.load(DIR, backend="onnx")`` (or ``"onnx-int8"``)
runs it with the training-time tokenisation, length-sorted batches and padding, without torch weights.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptext import artifacts, options
from adaptext.artifacts import library_versions
from adaptext.batching import check_texts, collate, predict_logits, sorted_batches
from adaptext.errors import AdaptextError
from adaptext.models import ModelSource, load_tokenizer
from adaptext.tasks import Task
from adaptext.windows import Windowing

FORMATS = ("onnx",)
QUANTIZE = ("int8",)
ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export.json"
DEFAULT_OPSET = 17  # LayerNormalization is one op from 17; the TorchScript exporter goes up to 20
OPSETS = range(14, 21)  # 14: scaled_dot_product_attention
INPUTS = ("input_ids", "attention_mask")
PARITY_TOLERANCE = 1e-3  # fp32 ONNX vs torch, max |logit difference|; measured below 1e-6 for every tested model
INSTALL = 'pip install "adaptext[onnx]"'

# Different lengths, so the check runs with padding, at batch size 1 and over several batches; the
# last is longer than any max_length, so truncation (or head+tail) is in the check too.
PROBE_TEXTS = [
    "",
    "ok",
    "Stocks rally as the central bank holds rates",
    "The team won the match after a late goal, and the coach praised every player in the squad.",
    "A probe found water ice near the lunar south pole. " * 3,
    "Markets, goals, rockets and the weather in one long rambling text. " * 80,
]


def require_onnx(export: bool = False) -> Any:
    """The onnxruntime module, or a one-line error naming the extra to install."""
    try:
        if export:
            import onnx  # noqa: F401  (the exporter and the quantiser need it)
        import onnxruntime
    except ImportError:
        raise AdaptextError(f"ONNX export and inference need the onnx and onnxruntime packages; {INSTALL}") from None
    return onnxruntime


# ---------------------------------------------------------------- inference with ONNX Runtime


def ort_session(path: Path) -> Any:
    ort = require_onnx()
    options = ort.SessionOptions()
    # One request at a time, spread over every core this process may use (ORT's own default counts
    # physical cores, which leaves SMT siblings and cgroup-limited machines mis-sized).
    options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise AdaptextError(f"ONNX Runtime cannot load {path} ({first}); re-run adaptext export") from None


def ort_logits(session: Any, encoded: list[list[int]], pad_id: int, batch_size: int, num_labels: int) -> np.ndarray:
    """Logits in input order over length-sorted batches: batching.predict_logits, run by ONNX Runtime."""
    logits = np.zeros((len(encoded), num_labels), dtype=np.float32)
    for batch in sorted_batches([len(x) for x in encoded], batch_size, slack=1.25, max_tokens=2048):
        inputs = {name: tensor.numpy() for name, tensor in collate([encoded[i] for i in batch], pad_id).items()}
        logits[batch] = session.run(["logits"], inputs)[0]
    return logits


class OnnxClassifier:
    """A trained model run by ONNX Runtime on the CPU; the same interface as ``predict.Classifier``."""

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        meta: dict[str, Any],
        class_names: list[str],
        batch_size: int,
        precision: str = "fp32",
    ):
        self.session = session
        self.tokenizer = tokenizer
        self.meta = meta
        self.class_names = class_names
        self.batch_size = batch_size
        saved = options.saved_config(meta["config"])
        self.max_length = saved.max_length
        self.long_text = saved.long_text
        self.windowing = Windowing.from_config(saved)
        self.task = Task.from_meta(meta)
        self.precision = precision

    def logits(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        rows = self.windowing.encode(self.tokenizer, texts)
        logits = ort_logits(self.session, rows.ids, self.tokenizer.pad_token_id, self.batch_size, len(self.class_names))
        return self.windowing.pool_logits(logits, rows)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.task.scores(self.logits(texts))

    def predict(self, texts: list[str] | str, top_k: int = 1) -> list[dict[str, Any]]:
        """One dict per text, as ``predict.Classifier.predict``."""
        return self.task.results(self.logits([texts] if isinstance(texts, str) else texts), self.class_names, top_k)


def load_onnx(folder: str | Path, quantized: bool = False, batch_size: int = 64) -> OnnxClassifier:
    """The ONNX export of a model directory (``DIR/onnx/model.onnx``, or ``model.int8.onnx``)."""
    folder = Path(folder).expanduser()
    meta = artifacts.read_meta(folder)
    path = folder / ONNX_DIR / (INT8_FILE if quantized else FP32_FILE)
    if not path.is_file():
        how = f"adaptext export --model {folder} --format onnx" + (" --quantize int8" if quantized else "")
        raise AdaptextError(f"{folder} has no ONNX export ({ONNX_DIR}/{path.name}); run {how}")
    session = ort_session(path)
    labels = artifacts.read_labels(folder)
    class_names = artifacts.class_names_of(labels)
    tokenizer = load_tokenizer(ModelSource(str(folder), str(folder), None))
    # int8: weights quantised per channel, activations at run time (fp32 otherwise)
    return OnnxClassifier(session, tokenizer, meta, class_names, batch_size, "int8" if quantized else "fp32")


# ---------------------------------------------------------------- export


@dataclass
class ExportResult:
    folder: Path  # holds model.onnx, model.int8.onnx (if quantised) and export.json
    report: dict[str, Any]  # what export.json holds


def export(
    model_dir: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    quantize: str | None = None,
    opset: int | None = None,
) -> ExportResult:
    """``adaptext export``: ONNX is the one format so far (``opset`` None: ``DEFAULT_OPSET``)."""
    if format not in FORMATS:
        raise AdaptextError(f"--format {format!r} is not supported; use --format {' or '.join(FORMATS)}")
    return export_onnx(model_dir, output, quantize, DEFAULT_OPSET if opset is None else opset)


def export_onnx(
    model_dir: str | Path, output: str | Path | None = None, quantize: str | None = None, opset: int = DEFAULT_OPSET
) -> ExportResult:
    """Export a trained model directory to ONNX (LoRA merged) and check it against the torch model.

    Writes ``model.onnx`` (plus ``model.int8.onnx`` with ``quantize="int8"``) and ``export.json``
    into ``output`` (default ``MODEL_DIR/onnx``, replaced whole). Fails, writing nothing, if the
    fp32 graph's logits differ from torch's by more than ``PARITY_TOLERANCE`` on the probe texts.
    """
    folder = Path(model_dir).expanduser()
    meta = artifacts.read_meta(folder)  # a missing or foreign directory fails before anything is written
    if quantize not in (None, *QUANTIZE):
        raise AdaptextError(f"--quantize {quantize!r}: use --quantize int8, or leave it out for fp32 only")
    if opset not in OPSETS:
        raise AdaptextError(f"--opset {opset}: use {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    require_onnx(export=True)
    target = _check_target(Path(output).expanduser() if output else folder / ONNX_DIR)

    loaded = artifacts.load_model(folder, torch.device("cpu"), merge=True)
    pad_id = loaded.tokenizer.pad_token_id
    probes = loaded.windowing.encode(loaded.tokenizer, PROBE_TEXTS).ids  # the rows the model sees (windows too)
    num_labels = len(loaded.class_names)
    reference = {
        size: predict_logits(loaded.model, probes, pad_id, size, "fp32", torch.device("cpu")) for size in (1, 4)
    }

    def parity(path: Path) -> dict[str, Any]:
        session = ort_session(path)
        diffs, agree = [], []
        for size, expected in reference.items():  # batches of 4 carry padding; batch size 1 nearly none
            got = ort_logits(session, probes, pad_id, size, num_labels)
            diffs.append(float(np.abs(got - expected).max()))
            agree.append(float((got.argmax(1) == expected.argmax(1)).mean()))
        return {"max_abs_logit_diff": max(diffs), "same_label": min(agree)}

    report: dict[str, Any] = {"format": "onnx", "opset": opset, "quantize": quantize}
    with artifacts.staged_dir(target) as staging:
        started = time.perf_counter()
        # Trace the shortest and longest probes as one padded batch: the branches transformers takes for
        # a mask with padding are the ones recorded (it can skip an all-ones mask).
        example = collate([min(probes, key=len), max(probes, key=len)], pad_id)
        _trace_to_onnx(loaded.model, example, staging / FP32_FILE, opset)
        seconds = {"export": round(time.perf_counter() - started, 2)}
        report["parity"] = {"fp32": parity(staging / FP32_FILE)}
        gap = report["parity"]["fp32"]["max_abs_logit_diff"]
        if not gap <= PARITY_TOLERANCE:  # also catches NaN
            raise AdaptextError(
                f"the ONNX graph of this {loaded.model.config.model_type} model gives logits {gap:.2g} away from "
                f"torch's (tolerance {PARITY_TOLERANCE:g}); nothing was written; keep using --backend torch"
            )
        if quantize:
            started = time.perf_counter()
            report["quantization"] = _quantize_int8(staging / FP32_FILE, staging / INT8_FILE)
            seconds["quantize"] = round(time.perf_counter() - started, 2)
            report["parity"]["int8"] = parity(staging / INT8_FILE)
        report.update(
            {
                "exporter": "torch.onnx.export(dynamo=False), TorchScript tracer",
                "inputs": list(INPUTS),
                "outputs": ["logits"],
                "dynamic_axes": ["batch", "sequence"],
                "probe_texts": len(PROBE_TEXTS),
                "tolerance": PARITY_TOLERANCE,
                "tokenizer": {**loaded.windowing.describe(), "pad_token_id": pad_id},
                "class_names": loaded.class_names,
                "source": {
                    "model_dir": str(folder.resolve()),
                    "method": meta["method"],
                    "base_model": meta["base_model"]["name"],
                    "model_type": loaded.model.config.model_type,
                },
                "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())},
                "seconds": seconds,
                "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        artifacts.write_json(staging / REPORT_FILE, report)
    return ExportResult(target.resolve(), report)


def _check_target(target: Path) -> Path:
    """A new or empty folder, or an earlier export (which is replaced); never a folder of other files."""
    artifacts.check_output(target, overwrite=True)
    if target.is_dir() and any(target.iterdir()) and not (target / REPORT_FILE).is_file():
        raise AdaptextError(
            f"--output {str(target)!r} holds files that are not an adaptext export; choose a new or empty folder"
        )
    return target


class _LogitsOnly(nn.Module):
    """The graph's signature: logits = f(input_ids, attention_mask), tensors only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _trace_to_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    # Why the TorchScript exporter (dynamo=False), not torch.export (dynamo=True): with torch 2.13 and
    # transformers 5.24 both reproduce torch's logits to < 1e-6 for BERT, RoBERTa, DistilBERT, GPT-2,
    # MPNet, DeBERTa-v2, ModernBERT and Llama and for every adaptext method (batches 1-8, lengths 1-128,
    # padded or not), but dynamo takes 7-20 s per tiny model and 16 s for MiniLM against 0.2-0.5 s and
    # 3 s on 2 cores, prints pages of progress and needs onnxscript. A trace records only the Python
    # branches the example took; the parity check after it is what makes that safe. torch deprecates
    # this exporter: when it is removed, switch to dynamo=True with dynamic_shapes (measured just as exact).
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # answered by the parity check
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)  # DeBERTa
        try:
            torch.onnx.export(
                _LogitsOnly(model).eval(),
                (example["input_ids"], example["attention_mask"]),
                str(path),
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        except Exception as exc:  # the exporter raises many types; the user needs one line
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise AdaptextError(
                f"ONNX export of this {model.config.model_type} model failed ({type(exc).__name__}: {first}); "
                "keep using --backend torch"
            ) from None


def _quantize_int8(source: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Why per-channel QInt8 with 7-bit range: on MiniLM / AG News (1,000 test texts, an AVX2 CPU
    # without VNNI) it kept the fp32 label on 98.5% of texts, max |logit difference| 0.035; per-tensor
    # 97.0% (0.084), per-channel without reduce_range 98.2%, QUInt8 98.1%. reduce_range avoids the
    # u8 x s8 overflow of x86 CPUs without VNNI and costs little on those with it.
    settings = {"weight_type": "QInt8", "per_channel": True, "reduce_range": True}
    with _drop_root_log("Please consider to run pre-processing before quantization"):
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    return {"method": "onnxruntime.quantization.quantize_dynamic", **settings}


@contextlib.contextmanager
def _drop_root_log(prefix: str) -> Iterator[None]:
    """Hide one advice line that onnxruntime's quantiser logs on the root logger on every call."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _versions() -> dict[str, str]:
    versions = library_versions()
    for name in ("onnx", "onnxruntime"):
        versions[name] = importlib.metadata.version(name)
    return versions
