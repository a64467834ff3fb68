"""SetFit as an arm of ``adaptext compare``: the peer built for few labels, run through the ``setfit``
library itself on exactly the splits the other arms get.

SetFit (Tunstall et al. 2022) fine-tunes a sentence-transformers body contrastively on pairs of training
texts, then fits a logistic-regression head on its embeddings. Everything here is the library's own
default recipe (pair sampling, one epoch, body learning rate 2e-5, scikit-learn head); adaptext only
supplies the data, the seed, ``--max-length`` and the base model (the ``minilm`` and ``mpnet`` aliases are
sentence-transformers folders, so it runs offline), and scores the predictions with the same metrics as
every other arm. The run folder holds metrics.json and adaptext.json like a training run (so compare
reports it) and the SetFit model under ``setfit/``; it is not an adaptext model (predict/serve do not
load it).

Run as ``python -m adaptext.setfit_arm RUN_CONFIG.yaml`` (what compare does, one process per run).
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import Any

import numpy as np

from adaptext import artifacts, config, data, models, option_files, options
from adaptext.artifacts import library_versions, peak_rss_mb
from adaptext.errors import AdaptextError
from adaptext.tasks import Task

BODY_LR = 2e-5  # setfit.TrainingArguments' default body_learning_rate, recorded as the arm's lr


def require() -> None:
    """One clear line when the optional extra is missing."""
    try:
        import setfit  # noqa: F401
    except ImportError:
        raise AdaptextError(
            "the setfit arm needs the setfit package: pip install 'adaptext[setfit]' (or drop setfit from --methods)"
        ) from None


def run(cfg: config.TrainConfig, echo: Any = print) -> dict[str, Any]:
    """Train SetFit on cfg's data and seed; write the run folder like a training run; return its metrics."""
    require()
    import torch
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    models.quiet_transformers()
    dataset = data.load_training_data(cfg)
    if dataset.task != "single-label":
        raise AdaptextError(f"the setfit arm is for single-label data; this is {dataset.task}")
    output = artifacts.check_output(cfg.output, cfg.overwrite)
    source = models.resolve_model(cfg.model)
    train = dataset.splits["train"]
    echo(f"setfit: {source.name} on {len(train):,} examples, seed {cfg.seed}")
    torch.manual_seed(cfg.seed)
    model = SetFitModel.from_pretrained(source.path)
    scratch = tempfile.TemporaryDirectory(prefix="adaptext-setfit-")  # its Trainer's checkpoints, not the cwd's
    args = TrainingArguments(
        output_dir=scratch.name, seed=cfg.seed, max_length=cfg.max_length, report_to="none", show_progress_bar=False
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": list(train.texts), "label": list(train.labels)}),
    )
    started = time.perf_counter()
    with scratch:
        trainer.train()
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {"history": [], "best": None, **_score(model, dataset)}
    body = sum(p.numel() for p in model.model_body.parameters())
    head = (model.model_body.get_sentence_embedding_dimension() + 1) * len(dataset.class_names)
    metrics["train"] = {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "seconds": round(seconds, 2),
        "wall_seconds": round(seconds, 2),
        "samples_per_second": round(len(train) / seconds, 2),
        "rows": len(train),
        "precision": "fp32",
        "device": str(model.device),
    }
    meta = {
        "format_version": artifacts.FORMAT_VERSION,
        "method": "setfit",
        "arm": "setfit",
        "base_model": source.to_dict(),
        "params": {
            "adapter": body,
            "head": head,
            "trainable": body + head,
            "total": body + head,
            "trainable_percent": 100.0,
        },  # fmt: skip
        "lr": BODY_LR,
        "class_names": dataset.class_names,
        "config": cfg.to_dict(),
        "versions": {**library_versions(), "setfit": _version("setfit")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with artifacts.staged_dir(output) as staging:
        model.save_pretrained(str(staging / "setfit"))
        artifacts.write_json(staging / artifacts.META_FILE, meta)
        artifacts.write_json(staging / "metrics.json", metrics)
    final = metrics.get("test") or metrics.get("validation")
    if final:
        echo(f"{'test' if 'test' in metrics else 'validation'}: accuracy {final['accuracy']:.4f}  "
             f"macro-F1 {final['macro_f1']:.4f} ({seconds:.0f} s)")  # fmt: skip
    return metrics


def _score(model: Any, dataset: data.TextDataset) -> dict[str, Any]:
    """Validation and test metrics from SetFit's probabilities (as logits whose softmax gives them back)."""
    task, metrics = Task(), {}
    for split in ("validation", "test"):
        if split not in dataset.splits:
            continue
        part = dataset.splits[split]
        columns = np.asarray(model.predict_proba(part.texts, as_numpy=True), dtype=np.float64)
        probs = np.zeros((len(part.texts), len(dataset.class_names)))
        probs[:, [int(c) for c in model.model_head.classes_]] = columns  # a class absent from training: 0
        logits = np.log(np.clip(probs, 1e-12, 1.0))  # softmax(log p) = p: the loss is SetFit's log loss
        metrics[split] = task.metrics(part.labels, logits, dataset.class_names)
        metrics[split]["precision"] = "fp32"
    return metrics


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise AdaptextError("usage: python -m adaptext.setfit_arm RUN_CONFIG.yaml")
        run(options.validate(options.from_dict(option_files.load_file(argv[0]), source=argv[0])))
    except AdaptextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
