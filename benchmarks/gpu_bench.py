"""GPU throughput of adaptext's own training loop and inference path, with MFU.

MiniLM and MPNet at sequence length 128, batch 64, adaptext's ``--precision auto`` (bf16 autocast on
GPUs that have bf16, else fp16): LoRA (q, v, r=8) and full fine-tuning through
``adaptext.train.train_loop`` (the loop ``adaptext train`` runs), optionally ``torch.compile``d, then
inference with the LoRA merged through ``predict_logits``. Every row records its precision and its MFU
is against the matmul peak of that precision, measured at the start of the same run (fp32, bf16 and
fp16 on CUDA; flops.matmul_peaks). Inputs are
synthetic token ids of exactly 128 tokens, so throughput does not depend on a dataset. Where a
model's weights are not on the machine, it is built from its config with random weights: same
shapes, same FLOPs, same speed.

    python benchmarks/gpu_bench.py --json gpu.json --markdown gpu.md     # or: bash benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import Shape, describe_peaks, forward_flops, matmul_peaks, mfu, train_flops  # noqa: E402

# Dense bf16 tensor-core peak from NVIDIA's data sheets (SXM parts), for the nominal MFU column.
NOMINAL_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
SEQ = 128
BATCH = 64


def nominal_peak(name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16.items() if k in name), None)


def build(name: str, path: str | None):
    """(model, head_modules, weights) for an alias or directory; random weights if none are here."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, MPNetConfig

    from adaptext import models
    from adaptext.errors import AdaptextError

    id2label = {i: f"c{i}" for i in range(4)}
    try:
        source = models.resolve_model(path or name)
        if any(Path(source.path).glob("*.safetensors")):
            model, heads = models.load_classifier(source, 4, id2label, 0)
            return model, heads, "pretrained"
        config = AutoConfig.from_pretrained(source.path)
    except AdaptextError:
        config = MPNetConfig() if name == "mpnet" else None
        if config is None:
            raise
    config.num_labels, config.id2label, config.label2id = 4, id2label, {v: k for k, v in id2label.items()}
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    return model, ["classifier"], "random (same shapes as the real model)"


def synthetic(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, SEQ), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids.tolist(), torch.randint(0, 4, (n,), generator=g).tolist()


def train_case(name: str, path: str | None, method: str, compile_: bool, steps: int, device: torch.device):
    from adaptext import config, models
    from adaptext.precision import resolve as resolve_precision
    from adaptext.train import train_loop

    model, heads, weights = build(name, path)
    cfg = config.TrainConfig(
        method=method, batch_size=BATCH, max_length=SEQ, epochs=1, compile=compile_, log_every=10**6, seed=0
    )
    model, _ = models.prepare(model, cfg, heads, steps)
    model.to(device)
    vocab = model.config.vocab_size
    val_ids, val_labels = synthetic(BATCH, vocab, 1)
    names = [f"c{i}" for i in range(4)]
    warm_ids, warm_labels = synthetic(BATCH * (8 if compile_ else 3), vocab, 2)
    started = time.perf_counter()
    train_loop(model, warm_ids, warm_labels, val_ids, val_labels, names, 0, cfg, progress=False)
    warmup_s = time.perf_counter() - started
    ids, labels = synthetic(BATCH * steps, vocab, 3)
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    result = train_loop(model, ids, labels, val_ids, val_labels, names, 0, cfg, progress=False)
    shape = Shape.of(model.config)
    flops = train_flops(shape, [SEQ] * len(ids), 0, weights_trained=method == "full")
    return model, {
        "model": name,
        "weights": weights,
        "method": method,
        "compile": compile_,
        "precision": resolve_precision(cfg.precision, device),  # what train_loop resolved "auto" to
        "warmup_s": round(warmup_s, 1),
        "samples_per_s": round(result.samples_per_second, 1),
        "tokens_per_s": round(result.tokens_per_second),
        "tflops": round(flops / result.train_seconds / 1e12, 1),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
        "flops": flops,
        "seconds": result.train_seconds,
    }


def infer_case(model, name: str, batch: int, n: int, device: torch.device):
    from adaptext.batching import predict_logits
    from adaptext.precision import resolve as resolve_precision

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    precision = resolve_precision("auto", device)
    ids, _ = synthetic(n, model.config.vocab_size, 4)
    predict_logits(model, ids[: batch * 3], 0, batch, precision, device)  # warm-up
    torch.cuda.synchronize() if device.type == "cuda" else None
    started = time.perf_counter()
    predict_logits(model, ids, 0, batch, precision, device)
    seconds = time.perf_counter() - started
    flops = forward_flops(Shape.of(model.config), [SEQ] * n)
    return {
        "model": name,
        "batch": batch,
        "precision": precision,
        "samples_per_s": round(n / seconds, 1),
        "tokens_per_s": round(n * SEQ / seconds),
        "tflops": round(flops / seconds / 1e12, 1),
        "flops": flops,
        "seconds": seconds,
    }


def markdown(report: dict) -> str:
    peaks, nominal = report["peaks"], report["nominal_bf16_flops"]
    unit = 1e12 if report["device_name"] != "cpu" else 1e9
    unit_name = "TFLOP/s" if unit == 1e12 else "GFLOP/s"

    def measured(r: dict) -> str:
        return f"{mfu(r['flops'], r['seconds'], r['precision'], peaks):.1%}"

    def data_sheet(r: dict) -> str:  # the data sheet gives the dense bf16/fp16 tensor-core rate (equal on these)
        return f"{r['flops'] / r['seconds'] / nominal:.1%}" if nominal and r["precision"] in ("bf16", "fp16") else "-"

    lines = [
        f"Device: {report['device_name']} · torch {report['torch']} · transformers {report['transformers']} · "
        f"matmul peaks measured in this run: {describe_peaks(peaks, unit, unit_name)}"
        + (f" (bf16 data sheet {nominal / 1e12:.0f} TFLOP/s)" if nominal else ""),
        "",
        f"Training (sequence length {SEQ}, batch {BATCH}, adaptext's loop with `--precision auto`):",
        "",
        "| model | weights | method | compile | precision | samples/s | tokens/s | TFLOP/s "
        "| MFU (measured peak of its precision) | MFU (data sheet) | GPU peak MB | warm-up s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["train"]:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['method']} | {r['compile']} | | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['method']} | {'yes' if r['compile'] else 'no'} | {r['precision']} | "
            f"{r['samples_per_s']:,.0f} | {r['tokens_per_s']:,} | {r['tflops']} | {measured(r)} "
            f"| {data_sheet(r)} | {r['gpu_peak_mb']} | {r['warmup_s']} |"
        )
    lines += ["", "Inference (LoRA merged, `--precision auto`, length-sorted batches):", ""]
    lines += [
        "| model | batch | precision | samples/s | tokens/s | TFLOP/s | MFU (measured peak of its precision) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["infer"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['samples_per_s']:,.0f} | {r['tokens_per_s']:,} | "
            f"{r['tflops']} | {measured(r)} |"
        )
    lines += ["", "MFU counts real-token FLOPs (formula in benchmarks/flops.py): full fine-tuning 3x the forward, "
              "LoRA 2x (frozen weights still pass gradients down); each row's against the peak of the "
              "precision it ran in."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,mpnet")
    parser.add_argument("--minilm-path", help="directory of all-MiniLM-L6-v2 (default: the installed package)")
    parser.add_argument("--mpnet-path", help="directory of all-mpnet-base-v2 (default: the mpnet alias)")
    parser.add_argument("--steps", type=int, default=80, help="timed training steps per case")
    parser.add_argument("--infer-n", type=int, default=64 * 60, help="sequences per inference case")
    parser.add_argument("--compile", default="lora", help="methods also measured under torch.compile ('' = none)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peaks = matmul_peaks(device.type)
    report = {
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peaks": peaks,
        "peak_bf16_flops": peaks["bf16"],  # kept for readers of older reports
        "nominal_bf16_flops": nominal_peak(name),
        "train": [],
        "infer": [],
    }
    print(f"{name}: matmul peaks {describe_peaks(peaks, 1e12, 'TFLOP/s')}", flush=True)
    compiled = [m for m in args.compile.split(",") if m]
    for model_name in args.models.split(","):
        path = args.minilm_path if model_name == "minilm" else args.mpnet_path
        for method in ("lora", "full"):
            for compile_ in [False] + ([True] if method in compiled else []):
                try:
                    model, row = train_case(model_name, path, method, compile_, args.steps, device)
                except Exception as exc:  # one broken case must not lose the others' numbers
                    traceback.print_exc()
                    report["train"].append({"model": model_name, "method": method, "compile": compile_,
                                            "error": str(exc).splitlines()[0][:120]})  # fmt: skip
                    continue
                report["train"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("flops",)}), flush=True)
                if method == "lora" and not compile_:
                    for batch in (64, 256):
                        inf = infer_case(model, model_name, batch, args.infer_n, device)
                        report["infer"].append(inf)
                        print(json.dumps({k: v for k, v in inf.items() if k != "flops"}), flush=True)
                del model
                torch.cuda.empty_cache() if device.type == "cuda" else None
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
