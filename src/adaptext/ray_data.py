"""Ray Data: label a dataset on a cluster, each actor loading the model once.

In your own pipeline::

    import ray
    from adaptext.ray_data import Predictor

    ds = ray.data.read_parquet("s3://bucket/texts/")
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model": "/shared/my-model"},
                        batch_format="pandas", batch_size=4096, concurrency=8)   # 8 actors
    ds.write_parquet("s3://bucket/labels/")

or ``adaptext predict --engine ray --input DIR --output labels.parquet`` (a local Ray cluster, or the
one ``RAY_ADDRESS`` names): Ray Data reads the input and runs the actors; this process writes the
output in input order with the same columns as ``adaptext predict``. Needs ``pip install
'adaptext[ray]'``; the model directory must be readable at the same path on every node.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adaptext.errors import AdaptextError
from adaptext.outputs import prediction_columns
from adaptext.predict import load
from adaptext.readers import TEXT_CANDIDATES, Table, pick_column, table_texts


class Predictor:
    """A callable class for ``ray.data.Dataset.map_batches(..., batch_format="pandas")``: returns the batch
    with the prediction columns added (label, score, top_k, prob_<class>..., precision; see
    adaptext.outputs.prediction_columns), or, with ``with_logits``, only the text, the ``keep`` columns
    and the raw ``logits`` (what ``adaptext predict --engine ray`` formats itself)."""

    def __init__(
        self,
        model: str,
        text_column: list[str] | str | None = None,
        top_k: int = 1,
        batch_size: int = 64,
        precision: str = "auto",
        backend: str = "torch",
        base: str | None = None,
        threads: int | None = None,
        with_logits: bool = False,
        keep: list[str] | None = None,
    ):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.classifier = load(model, batch_size=batch_size, precision=precision, base=base, backend=backend)
        self.text_columns = [text_column] if isinstance(text_column, str) else text_column
        self.top_k, self.with_logits, self.keep = top_k, with_logits, keep or []

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        columns = self.text_columns or [
            pick_column(batch, None, TEXT_CANDIDATES, "text", "--text-column", "Ray Data batch")
        ]
        texts = table_texts(Table(batch, None, "Ray Data batch"), columns)
        logits = self.classifier.logits(texts)
        if self.with_logits:
            out = pd.DataFrame({c: batch[c].to_numpy() for c in self.keep})
            out["text"] = texts
            out["logits"] = list(logits.astype(np.float32))
            out["precision"] = self.classifier.precision
            return out
        results = self.classifier.task.results(logits, self.classifier.class_names, self.top_k)
        added = prediction_columns(results, self.classifier.class_names, self.classifier.precision)
        return batch.assign(**added)


def read(files: list[Path]) -> Any:
    """The input files as one Ray Dataset (one format at a time: Ray Data has a reader per format)."""
    import ray.data

    suffixes = {p.suffix.lower() for p in files}
    paths = [str(p) for p in files]
    if suffixes == {".parquet"}:
        return ray.data.read_parquet(paths)
    if suffixes == {".csv"}:
        return ray.data.read_csv(paths)
    if suffixes <= {".jsonl", ".json"}:
        return ray.data.read_json(paths, lines=True) if suffixes == {".jsonl"} else ray.data.read_json(paths)
    raise AdaptextError(
        f"--engine ray reads one format at a time (Parquet, CSV or JSONL); the input mixes {', '.join(sorted(suffixes))}"
    )


def actor_cpus(threads: int, workers: int) -> float:
    """CPUs each of ``workers`` actors reserves: its threads, but never so many that no CPU is left for Ray
    Data's file listing and read tasks (1 CPU each): with every CPU held by actors they would never start."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.1, min(float(threads), (total - 1.0) / workers))


def start() -> None:
    """Join the cluster RAY_ADDRESS names, else start a local one with the cores of this machine."""
    try:
        import ray
    except ImportError:
        raise AdaptextError("--engine ray needs Ray Data: pip install 'adaptext[ray]'") from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the output rows in input order, as adaptext predict writes them
    ctx.enable_progress_bars = False
