"""Inference speed on the 7,600 AG News test texts: adaptext's predict path vs a plain PeftModel.

Baseline: the base model loaded with ``AutoModelForSequenceClassification`` and the saved adapter
attached with ``PeftModel.from_pretrained`` (LoRA unmerged; the model card's recipe for a machine
where the adapter's ``base_model_name_or_path``, a Hub id, is not cached), fp32, batches of 64 in dataset order with dynamic padding (``tokenizer(..., padding=True)``) — what a
careful user writes. adaptext: ``adaptext.load(dir)`` (LoRA merged, length-sorted batches, bf16 where
the hardware has it) and, when exported, ONNX Runtime fp32 and int8. Every timing includes
tokenisation; each path is warmed up on 128 texts first. Each row records the precision it ran in
(torch: the model's dtype or adaptext's resolved ``auto``; ONNX: fp32 or int8) and its MFU is against
the matmul peak of that precision, measured in the same run (int8: no MFU, its peak is not measured).

    python benchmarks/infer_speed.py [--model DIR] [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from flops import DTYPES, Shape, describe_peaks, forward_flops, matmul_peaks, mfu  # noqa: E402
from train_speed import default_data_dir  # noqa: E402

BATCH = 64


def test_texts(data_dir: Path, limit: int | None) -> tuple[list[str], list[int]]:
    from adaptext import config, data

    cfg = config.TrainConfig(data=str(data_dir / "ag_news"), train_size=1250, test_size=limit)
    test = data.load_training_data(cfg).splits["test"]
    return test.texts, test.labels


def peft_baseline(model_dir: Path):
    """(logits function, precision it runs in): the adapter on its base, as loaded by peft."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adaptext.models import resolve_model

    labels = json.loads((model_dir / "labels.json").read_text())
    # The adapter names its base by Hub id; the benchmark runs offline, so load the local copy of that base
    # (adaptext only finds the files; loading and inference are plain transformers + peft).
    base_name = json.loads((model_dir / "adaptext.json").read_text())["base_model"]["name"]
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(base_name).path, num_labels=labels["num_labels"], pad_token_id=labels["pad_token_id"]
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, model_dir).eval()
    if json.loads((model_dir / "adaptext.json").read_text()).get("pooling") == "mean":
        # Mean-pooled (MiniLM's own pooling): the model card's plain-transformers hook, as a user would run it.
        from adaptext.card import MEAN_POOL_SNIPPET

        exec(MEAN_POOL_SNIPPET, {"model": model})

    def logits(texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                enc = tokenizer(texts[start : start + BATCH], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")  # fmt: skip
                out.append(model(**enc).logits.float().numpy())
        return np.concatenate(out)

    dtype = next(model.parameters()).dtype
    return logits, next(name for name, known in DTYPES.items() if known == dtype)


def adaptext_backend(model_dir: Path, backend: str):
    """(logits function, precision it runs in) for adaptext's torch path (``auto``) or an ONNX export."""
    import adaptext

    if backend == "torch":
        classifier = adaptext.load(model_dir)
        return classifier.logits, classifier.precision
    return adaptext.load(model_dir, backend=backend).logits, "int8" if "int8" in backend else "fp32"


def timed(fn, texts: list[str]) -> tuple[np.ndarray, float]:
    fn(texts[:128])
    started = time.perf_counter()
    result = fn(texts)
    return result, time.perf_counter() - started


def train_model(data_dir: Path, folder: Path) -> None:
    print("training an adaptext model to serve (AG News 1,250 x 3, defaults) ...", flush=True)
    cmd = [sys.executable, str(HERE / "adaptext_run.py"), "--data", str(data_dir / "ag_news"), "--train-size", "1250"]
    env = {**__import__("os").environ, "ADAPTEXT_BENCH_KEEP": str(folder)}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*cmd, "--json", str(Path(tmp) / "r.json")], check=True, env=env, capture_output=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a trained adaptext directory (default: train one)")
    parser.add_argument("--quick", action="store_true", help="2,000 test texts instead of 7,600")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            train_model(data_dir, model_dir)
        result = measure(model_dir, data_dir, 2000 if args.quick else None)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def measure(model_dir: Path, data_dir: Path, limit: int | None, peaks: dict[str, float] | None = None) -> dict:
    """Every path over the test texts; MFU against ``peaks`` (flops.matmul_peaks; measured here if None)."""
    texts, labels = test_texts(data_dir, limit)
    labels = np.array(labels)
    if peaks is None:
        peaks = matmul_peaks("cpu")
        print(f"matmul peaks on this machine: {describe_peaks(peaks)}", flush=True)
    from adaptext import models
    from adaptext.artifacts import load_model

    loaded = load_model(model_dir, torch.device("cpu"))
    shape = Shape.of(loaded.model.config)
    lens = [len(x) for x in loaded.windowing.encode(loaded.tokenizer, texts).ids]  # every window's tokens
    flops = forward_flops(shape, lens)
    del loaded, models

    rows = {}
    base_fn, base_precision = peft_baseline(model_dir)
    base_logits, base_s = timed(base_fn, texts)
    base_pred = base_logits.argmax(1)
    rows[f"peft (unmerged, {base_precision}, dynamic padding, batch 64)"] = {
        "seconds": base_s,
        "pred": base_pred,
        "precision": base_precision,
    }
    backends = ["torch"]
    try:
        from adaptext import export

        for fmt, quantize in (("onnx", None), ("onnx-int8", "int8")):
            export.export_onnx(model_dir, quantize=quantize)
            backends.append(fmt)
    except Exception as exc:  # the onnx extra is optional
        print(f"ONNX backends skipped: {str(exc).splitlines()[0]}", flush=True)
    for backend in backends:
        logits_fn, precision = adaptext_backend(model_dir, backend)
        logits, seconds = timed(logits_fn, texts)
        rows[f"adaptext {backend}"] = {"seconds": seconds, "pred": logits.argmax(1), "precision": precision}
    out = {"n": len(texts), "flops": flops, "rows": {}}
    for name, row in rows.items():
        out["rows"][name] = {
            "precision": row["precision"],
            "samples_per_s": len(texts) / row["seconds"],
            "seconds": row["seconds"],
            "speedup_vs_peft": base_s / row["seconds"],
            "same_predictions": float((row["pred"] == base_pred).mean()),
            "accuracy": float((row["pred"] == labels).mean()),
            "accuracy_delta_pt": 100 * float((row["pred"] == labels).mean() - (base_pred == labels).mean()),
        }
    score(out, peaks)
    return out


def score(result: dict, peaks: dict[str, float]) -> None:
    """(Re)compute every row's MFU against the peak of its precision; int8 rows get None (their matmuls
    run against another, higher peak that is not measured: an fp32 MFU of them would mislead)."""
    # peak_flops (the fp32 peak) stays for readers of older results; peaks has one entry per precision.
    result.update(peak_flops=peaks["fp32"], peaks=peaks)
    for row in result["rows"].values():
        row["mfu"] = mfu(result["flops"], row["seconds"], row["precision"], peaks)


def table(result: dict) -> str:
    lines = [
        f"Inference on {result['n']:,} AG News test texts (tokenisation included; MFU against the matmul peak "
        f"of each row's precision, measured in this run: {describe_peaks(result['peaks'])}):",
        "",
        "| path | precision | texts/s | speedup vs peft | same predictions | accuracy | Δ accuracy (points) | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['precision']} | {r['samples_per_s']:.0f} | {r['speedup_vs_peft']:.2f}x | {r['same_predictions']:.2%} | "
            f"{r['accuracy']:.4f} | {r['accuracy_delta_pt']:+.2f} | "
            + ("— (int8)" if r["mfu"] is None else f"{r['mfu']:.1%}")
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
