"""`adaptext evaluate`: a saved model's metrics on a split or file (by default the test split of the data
it was trained on), through the same loader as predict, in torch or ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptext import artifacts, data, options
from adaptext.metrics import save_confusion_png
from adaptext.predict import load


def evaluate(
    model_dir: str | Path,
    data_spec: str | None = None,
    split: str | None = None,
    text_column: list[str] | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    save: str | Path | None = None,
    data_subset: str | None = None,
    encoding: str = "utf-8",
    limit: int | None = None,
    base: str | None = None,
    backend: str = "torch",
    precision: str = "auto",
) -> dict[str, Any]:
    """Metrics of a trained model on a split or file (default: the data it was trained on, test split).

    ``backend="onnx"``/``"onnx-int8"`` scores the ONNX export instead (see ``adaptext.export``). The metrics
    record the ``precision`` that computed them (``auto``: see ``adaptext.precision``).
    """
    classifier = load(model_dir, batch_size=batch_size, base=base, backend=backend, precision=precision)
    cfg = options.saved_config(classifier.meta["config"])
    spec = data_spec or cfg.data or str(data.demo_data_dir())
    split_data = data.load_eval_split(
        spec,
        split,
        classifier.class_names,
        text_column or cfg.text_column,
        label_column or cfg.label_column,
        data_subset,
        encoding,
        task=classifier.task.kind,
        separator=cfg.label_separator,
    )
    if limit is not None:
        split_data = data.stratified_sample(split_data, limit, cfg.seed)
    logits = classifier.logits(split_data.texts)
    metrics = classifier.task.metrics(split_data.labels, logits, classifier.class_names)
    metrics["precision"] = classifier.precision
    if save is not None:
        out = Path(save)
        out.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(out / "eval_metrics.json", metrics)
        if "confusion_matrix" in metrics:
            save_confusion_png(metrics["confusion_matrix"], classifier.class_names, out / "confusion_matrix.png")
    return metrics
