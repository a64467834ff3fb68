"""Inference speed on the 7,600 AG News test texts: adaptext's predict path vs a plain PeftModel.

Baseline: the saved adapter loaded with ``AutoPeftModelForSequenceClassification`` (LoRA unmerged),
fp32, batches of 64 in dataset order with dynamic padding (``tokenizer(..., padding=True)``) — what a
careful user writes. adaptext: ``adaptext.load(dir)`` (LoRA merged, length-sorted batches, bf16 where
the hardware has it) and, when exported, ONNX Runtime fp32 and int8. Every timing includes
tokenisation; each path is warmed up on 128 texts first.

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
from flops import Shape, forward_flops, matmul_peak  # noqa: E402
from train_speed import default_data_dir  # noqa: E402

BATCH = 64


def test_texts(data_dir: Path, limit: int | None) -> tuple[list[str], list[int]]:
    from adaptext import config, data

    cfg = config.TrainConfig(data=str(data_dir / "ag_news"), train_size=1250, test_size=limit)
    test = data.load_training_data(cfg).splits["test"]
    return test.texts, test.labels


def peft_baseline(model_dir: Path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    labels = json.loads((model_dir / "labels.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=labels["num_labels"], pad_token_id=labels["pad_token_id"]
    ).eval()

    def logits(texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                enc = tokenizer(texts[start : start + BATCH], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")  # fmt: skip
                out.append(model(**enc).logits.float().numpy())
        return np.concatenate(out)

    return logits


def adaptext_backend(model_dir: Path, backend: str):
    import adaptext

    if backend == "torch":
        return adaptext.load(model_dir).logits
    return adaptext.load(model_dir, backend=backend).logits


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


def measure(model_dir: Path, data_dir: Path, limit: int | None) -> dict:
    texts, labels = test_texts(data_dir, limit)
    labels = np.array(labels)
    peak = matmul_peak(torch.float32, "cpu")
    from adaptext import models
    from adaptext.artifacts import load_model

    loaded = load_model(model_dir, torch.device("cpu"))
    shape = Shape.of(loaded.model.config)
    lens = [len(x) for x in loaded.windowing.encode(loaded.tokenizer, texts).ids]  # every window's tokens
    flops = forward_flops(shape, lens)
    del loaded, models

    rows = {}
    base_logits, base_s = timed(peft_baseline(model_dir), texts)
    base_pred = base_logits.argmax(1)
    rows["peft (unmerged, fp32, dynamic padding, batch 64)"] = {"seconds": base_s, "pred": base_pred}
    backends = ["torch"]
    try:
        from adaptext import export

        for fmt, quantize in (("onnx", None), ("onnx-int8", "int8")):
            export.export_onnx(model_dir, quantize=quantize)
            backends.append(fmt)
    except Exception as exc:  # the onnx extra is optional
        print(f"ONNX backends skipped: {str(exc).splitlines()[0]}", flush=True)
    for backend in backends:
        logits, seconds = timed(adaptext_backend(model_dir, backend), texts)
        rows[f"adaptext {backend}"] = {"seconds": seconds, "pred": logits.argmax(1)}
    out = {"n": len(texts), "peak_flops": peak, "rows": {}}
    for name, row in rows.items():
        out["rows"][name] = {
            "samples_per_s": len(texts) / row["seconds"],
            "seconds": row["seconds"],
            "speedup_vs_peft": base_s / row["seconds"],
            "same_predictions": float((row["pred"] == base_pred).mean()),
            "accuracy": float((row["pred"] == labels).mean()),
            "accuracy_delta_pt": 100 * float((row["pred"] == labels).mean() - (base_pred == labels).mean()),
            # int8 matmuls run against another (higher) peak: an fp32 MFU of them would mislead.
            "mfu": None if "int8" in name else flops / row["seconds"] / peak,
        }
    return out


def table(result: dict) -> str:
    lines = [
        f"Inference on {result['n']:,} AG News test texts (tokenisation included):",
        "",
        "| path | texts/s | speedup vs peft | same predictions | accuracy | Δ accuracy (points) | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['samples_per_s']:.0f} | {r['speedup_vs_peft']:.2f}x | {r['same_predictions']:.2%} | "
            f"{r['accuracy']:.4f} | {r['accuracy_delta_pt']:+.2f} | "
            + ("— (int8)" if r["mfu"] is None else f"{r['mfu']:.1%}")
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
