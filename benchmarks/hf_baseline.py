"""The two plain transformers + peft baselines that adaptext's training speed is measured against (issue #4).

- ``notebook``: what a typical seed notebook does. ``Trainer`` + ``peft``, every text padded to the model
  maximum (``tokenizer.model_max_length``, 512 for MiniLM) in ``Dataset.map``, batch 8, fp32.
- ``expert``: what a careful engineer writes. ``Trainer`` + ``peft``, truncation at 256 tokens, dynamic
  padding (``DataCollatorWithPadding``, multiple of 8), length-grouped batches, batch 16, bf16 where the
  hardware has it (CUDA bf16, or a CPU with AMX/AVX512-BF16), else fp32.

Both train on exactly the examples adaptext trains on (``adaptext.data.load_training_data``: same data, sizes
and seed) with adaptext's default hyper-parameters (LoRA r 8, alpha 16, dropout 0.1 on query/value; warm-up
6 %, linear schedule, weight decay 0.01, gradient clipping 1.0), so only the pipeline differs. Nothing of
adaptext's own training code is used. Each evaluates once, at the end, on the test split.

Timing: ``data_s`` is reading and sampling the data with adaptext's loader (outside the wall time);
``load_s`` is tokenizer + model loading + attaching the method (peft / freezing); ``wall_s`` runs from the
start of tokenisation to the end of the test evaluation and is ``tokenize_s + setup_s + train_s + eval_s``
(``setup_s``: building ``TrainingArguments`` and ``Trainer``). Token counts come from a wrapping collator
that sees every batch the model is fed: ``*_real_tokens`` are non-padding tokens (attention mask ones),
``*_padded_tokens`` are all token slots including padding (batch x width summed over batches), so
``padding_fraction = 1 - real / padded``. ``train_batch_shapes`` / ``eval_batch_shapes`` list the
``[batch, width]`` of every batch fed, in order (for FLOP counting).

    python benchmarks/hf_baseline.py --style expert --method lora --data ../shared/data/ag_news \\
        --train-size 1250 --epochs 3 --json expert.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

STYLES = ("notebook", "expert")
METHODS = ("lora", "head", "full")
# Equal to adaptext's TrainConfig defaults, so that only the pipeline differs.
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.1
WARMUP_RATIO, WEIGHT_DECAY, MAX_GRAD_NORM = 0.06, 0.01, 1.0
EXPERT_MAX_LENGTH = 256  # adaptext's default --max-length
BATCH_SIZE = {"notebook": 8, "expert": 16}
EVAL_BATCH_SIZE = {"notebook": 8, "expert": 64}
# Attention projections as the peft docs write them for BERT-like encoders; other architectures get
# peft's own default mapping (target_modules=None).
TARGET_MODULES = {"bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"]}


class CountingCollator:
    """Wraps a data collator and records the shape and real (non-padding) tokens of every batch it builds.

    The Trainer builds train and eval batches with the same collator, so ``phase`` says where to count.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.phase = "train"
        self.shapes: dict[str, list[list[int]]] = {"train": [], "eval": []}
        self.real: dict[str, int] = {"train": 0, "eval": 0}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.shapes[self.phase].append([int(mask.shape[0]), int(mask.shape[1])])
        self.real[self.phase] += int(mask.sum())
        return batch

    def slots(self, phase: str) -> int:
        return sum(b * w for b, w in self.shapes[phase])


def pick_precision(style: str) -> str:
    """The precision this pipeline trains in, decided as its user would (recorded in its JSON: the
    harness computes its MFU against that precision's measured matmul peak)."""
    import torch

    from adaptext.precision import cpu_has_fast_bf16  # the same hardware test adaptext uses

    if style == "notebook":
        return "fp32"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def load_data(
    data: str, train_size: int | None, test_size: int | None, seed: int, method: str, epochs: float, lr: float
) -> Any:
    """The same splits adaptext trains and tests on for these options (validated by adaptext's own checks)."""
    from adaptext.config import TrainConfig
    from adaptext.data import load_training_data
    from adaptext.errors import AdaptextError
    from adaptext.options import validate

    cfg = TrainConfig(
        data=data, train_size=train_size, test_size=test_size, seed=seed, method=method, epochs=epochs, lr=lr
    )
    dataset = load_training_data(validate(cfg))
    if "test" not in dataset.splits:
        raise AdaptextError(f"{data}: no test split; the baseline evaluates on the test split")
    return dataset


def load_model(model_name: str, method: str, class_names: list[str]) -> tuple[Any, Any]:
    """Tokenizer and model as a user writes it in plain transformers + peft."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adaptext.models import resolve_model

    path = resolve_model(model_name).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        dtype=torch.float32,  # transformers 5 loads in the checkpoint's dtype by default; train in fp32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    # The head: the model's own parameterised children besides the pretrained body (BERT: classifier).
    body = model.base_model_prefix
    head = [name for name, child in model.named_children() if name != body and any(True for _ in child.parameters())]
    if method == "head":
        for param in model.base_model.parameters():
            param.requires_grad = False
    elif method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=TARGET_MODULES.get(model.config.model_type),
            modules_to_save=head,
        )
        with warnings.catch_warnings():  # peft 0.21 calls a helper transformers 5 deprecated; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, peft_config)
    return tokenizer, model


def tokenize(style: str, tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> Any:
    from datasets import Dataset

    if style == "notebook":
        encode = lambda batch: tokenizer(batch["text"], padding="max_length", truncation=True, max_length=max_length)
    else:
        encode = lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length)
    dataset = Dataset.from_dict({"text": texts, "label": labels})
    return dataset.map(encode, batched=True, remove_columns=["text"])


def run_baseline(
    style: str,
    method: str,
    data: str,
    train_size: int | None,
    epochs: float,
    lr: float | None = None,
    seed: int = 42,
    test_size: int | None = None,
    max_length: int | None = None,
    model: str = "minilm",
    max_steps: int | None = None,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """Train and test one baseline; return the measurements (see the module docstring).

    ``max_steps`` / ``eval_limit`` stop after that many optimiser steps / test examples and report
    the full run's training and test times projected from the measured per-step / per-example time
    (``projected: true``; the accuracy is then not the full run's). For slow pipelines in quick mode.
    """
    import numpy as np
    import torch
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    from adaptext.config import DEFAULT_LR

    if style not in STYLES or method not in METHODS:
        raise ValueError(f"style must be one of {STYLES} and method one of {METHODS}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets_quiet()
    lr = DEFAULT_LR[method] if lr is None else lr
    precision = pick_precision(style)

    data_started = time.perf_counter()
    dataset = load_data(data, train_size, test_size, seed, method, epochs, lr)
    train, test = dataset.splits["train"], dataset.splits["test"]
    data_s = time.perf_counter() - data_started

    started = time.perf_counter()
    set_seed(seed)  # before loading: the new head and the LoRA matrices are drawn at random
    tokenizer, net = load_model(model, method, dataset.class_names)
    load_s = time.perf_counter() - started
    if max_length is None:
        max_length = tokenizer.model_max_length if style == "notebook" else EXPERT_MAX_LENGTH
        if max_length > 100_000:  # tokenizers without a recorded maximum report a huge sentinel
            max_length = net.config.max_position_embeddings

    wall_started = time.perf_counter()
    train_ds = tokenize(style, tokenizer, train.texts, train.labels, max_length)
    test_ds = tokenize(style, tokenizer, test.texts, test.labels, max_length)
    if eval_limit and eval_limit < len(test_ds):
        test_ds = test_ds.select(range(eval_limit))
    tokenize_s = time.perf_counter() - wall_started

    full_steps = math.ceil(len(train) / BATCH_SIZE[style]) * math.ceil(epochs)
    if max_steps and max_steps >= full_steps:
        max_steps = None  # the whole run is no longer than the cap: run it
    setup_started = time.perf_counter()
    expert = style == "expert"
    collator = CountingCollator(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if expert else None))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_baseline_"),  # nothing is saved there (save_strategy="no")
        num_train_epochs=epochs,
        max_steps=max_steps or -1,
        learning_rate=lr,
        per_device_train_batch_size=BATCH_SIZE[style],
        per_device_eval_batch_size=EVAL_BATCH_SIZE[style],
        warmup_steps=WARMUP_RATIO,  # transformers 5: a float below 1 is a ratio (warmup_ratio is gone)
        lr_scheduler_type="linear",
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        # transformers 5 replaced group_by_length=True with this; it groups the eval batches too.
        train_sampling_strategy="group_by_length" if expert else "random",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),  # required for bf16 on CPU
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        log_level="error",
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
    )
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # it prints the final train metrics dict; we print our own line
    setup_s = time.perf_counter() - setup_started

    train_started = time.perf_counter()
    train_output = trainer.train()
    train_s = time.perf_counter() - train_started

    collator.phase = "eval"
    eval_started = time.perf_counter()
    prediction = trainer.predict(test_ds)
    # Length-grouped eval batches come back in sampler order; label_ids follow the same order.
    predicted = np.asarray(prediction.predictions).argmax(-1)
    gold = np.asarray(prediction.label_ids)
    accuracy = float(accuracy_score(gold, predicted))
    macro_f1 = float(f1_score(gold, predicted, average="macro"))
    eval_s = time.perf_counter() - eval_started
    wall_s = time.perf_counter() - wall_started
    shutil.rmtree(args.output_dir, ignore_errors=True)
    if len(gold) != len(test_ds):
        raise RuntimeError(f"predicted {len(gold)} test examples, expected {len(test)}")

    train_samples = sum(batch for batch, _ in collator.shapes["train"])
    train_real, train_slots = collator.real["train"], collator.slots("train")
    eval_real, eval_slots = collator.real["eval"], collator.slots("eval")
    device = trainer.args.device
    return {
        "style": style,
        "method": method,
        "wall_s": round(wall_s, 3),
        "data_s": round(data_s, 3),
        "load_s": round(load_s, 3),
        "tokenize_s": round(tokenize_s, 3),
        "setup_s": round(setup_s, 3),
        "train_s": round(train_s, 3),
        "eval_s": round(eval_s, 3),
        "train_samples_per_s": round(train_samples / train_s, 3),
        "train_real_tokens_per_s": round(train_real / train_s, 1),
        "padding_fraction": round(1 - train_real / train_slots, 5) if train_slots else 0.0,
        "eval_padding_fraction": round(1 - eval_real / eval_slots, 5) if eval_slots else 0.0,
        "train_real_tokens": train_real,
        "train_padded_tokens": train_slots,
        "eval_real_tokens": eval_real,
        "eval_padded_tokens": eval_slots,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "test_accuracy": round(accuracy, 5),
        "test_macro_f1": round(macro_f1, 5),
        "test_loss": round(float(prediction.metrics.get("test_loss", math.nan)), 5),
        "train_loss": round(float(train_output.training_loss), 5),
        "n_train": len(train),
        "train_samples": train_samples,
        "n_test": len(test),
        "epochs": epochs,
        "steps": int(train_output.global_step),
        "batch_size": BATCH_SIZE[style],
        "eval_batch_size": EVAL_BATCH_SIZE[style],
        "max_length": max_length,
        "precision": precision,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "lr": lr,
        "optimizer": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
        "model": model,
        "seed": seed,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft")},
        "projected": bool(max_steps or (eval_limit and eval_limit < len(test))),
        "full_steps": full_steps,
        "projected_train_s": round(train_s * full_steps / max(int(train_output.global_step), 1), 3),
        "projected_eval_s": round(eval_s * len(test) / max(len(gold), 1), 3),
        "train_batch_shapes": collator.shapes["train"],
        "eval_batch_shapes": collator.shapes["eval"],
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """One key per line (batch shape lists stay on one line), written to a temp file then renamed."""
    path = Path(path)
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items()) + "\n}\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary(result: dict[str, Any]) -> str:
    return (
        f"{result['style']}/{result['method']}: wall {result['wall_s']:.1f}s (train {result['train_s']:.1f}s, "
        f"eval {result['eval_s']:.1f}s, load {result['load_s']:.1f}s), {result['train_samples_per_s']:.1f} samples/s, "
        f"{result['train_real_tokens_per_s']:.0f} real tok/s, padding {result['padding_fraction']:.3f}, "
        f"test acc {result['test_accuracy']:.4f}, macro-F1 {result['test_macro_f1']:.4f}, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['precision']} on {result['device']}"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number (got {text})")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--style", required=True, choices=STYLES, help="notebook or expert pipeline")
    parser.add_argument("--method", default="lora", choices=METHODS, help="what to train (default lora)")
    parser.add_argument("--data", required=True, help="dataset, as adaptext's --data")
    parser.add_argument("--train-size", type=_positive_int, help="training examples (as adaptext's --train-size)")
    parser.add_argument("--test-size", type=_positive_int, help="test examples (default: the whole test split)")
    parser.add_argument("--epochs", type=_positive_float, default=3.0, help="training epochs (default 3)")
    parser.add_argument("--lr", type=_positive_float, help="peak learning rate (default: adaptext's for --method)")
    parser.add_argument("--seed", type=int, default=42, help="seed for data sampling and training (default 42)")
    parser.add_argument(
        "--max-length",
        type=_positive_int,
        help="truncate to this many tokens (default: notebook model max, expert 256)",
    )
    parser.add_argument("--model", default="minilm", help="model alias or local directory (default minilm)")
    parser.add_argument("--max-steps", type=_positive_int, help="stop after N steps; project the full time")
    parser.add_argument("--eval-limit", type=_positive_int, help="test on N examples; project the full time")
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json: folder {str(Path(args.json).resolve().parent)!r} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from adaptext.errors import AdaptextError

    try:
        result = run_baseline(
            style=args.style,
            method=args.method,
            data=args.data,
            train_size=args.train_size,
            epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
            test_size=args.test_size,
            max_length=args.max_length,
            model=args.model,
            max_steps=args.max_steps,
            eval_limit=args.eval_limit,
        )
    except AdaptextError as exc:
        print(f"hf_baseline: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        write_json(result, args.json)
    print(summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
