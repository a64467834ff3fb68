"""Predictions out of `adaptext predict`: CSV, JSONL or Parquet files (written atomically, a part at a
time) or lines on stdout."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adaptext.artifacts import atomic_path
from adaptext.errors import AdaptextError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def check_output(path: Path) -> str:
    """The format ``path``'s extension asks for, or one line saying what to use instead."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AdaptextError(f"--output {path}: use a .csv, .jsonl or .parquet file name")
    if not path.resolve().parent.is_dir():
        raise AdaptextError(f"--output {path}: folder {path.resolve().parent} does not exist")
    return fmt


class PredictionWriter:
    """Appends predictions to an open file, one block of rows at a time, in one of three formats.

    Columns: the kept input columns (``--keep-columns``), text, then per task: label, score, prob_<class>...
    (single-label); labels (a JSON list), prob_<class>... (multi-label); value (regression); then the
    precision that computed them. JSONL rows are the objects ``--json`` prints; Parquet adds ``top_k``."""

    def __init__(self, path: Path, class_names: list[str], precision: str, kept: list[str] | None = None):
        self.fmt = check_output(path)
        self.path, self.class_names, self.precision, self.kept = path, class_names, precision, kept or []
        self.rows = 0
        self._handle: Any = None
        self._csv: Any = None
        self._parquet: Any = None

    def write(self, texts: list[str], results: list[dict[str, Any]], kept: dict[str, list[Any]] | None = None) -> None:
        kept = kept or {}
        if self.fmt == "parquet":
            self._write_parquet(texts, results, kept)
        elif self.fmt == "csv":
            rows = _csv_rows(texts, results, self.class_names)
            if self.rows == 0:
                self._csv.writerow(self.kept + rows[0] + ["precision"])
            for i, row in enumerate(rows[1:]):
                self._csv.writerow([kept[c][i] for c in self.kept] + row + [self.precision])
        else:
            for i, (text, row) in enumerate(zip(texts, results)):
                record = {c: kept[c][i] for c in self.kept} | {"text": text, **row, "precision": self.precision}
                self._handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.rows += len(texts)

    def _write_parquet(self, texts: list[str], results: list[dict[str, Any]], kept: dict[str, list[Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {c: kept[c] for c in self.kept} | {"text": texts}
        table = pa.table(columns | prediction_columns(results, self.class_names, self.precision))
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._handle, table.schema)
        else:
            try:
                table = table.cast(self._parquet.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                raise AdaptextError(
                    f"--keep-columns: a column changes type within the input ({table.schema} vs "
                    f"{self._parquet.schema}); make it one type or write .csv/.jsonl"
                ) from None
        self._parquet.write_table(table)


def prediction_columns(results: list[dict[str, Any]], class_names: list[str], precision: str) -> dict[str, list[Any]]:
    """Predictions as columns (Parquet files, Ray Data batches): label, score, top_k, prob_<class>...
    (single-label); labels, top_k, prob_<class>... (multi-label); value (regression); then precision."""
    columns: dict[str, list[Any]] = {}
    if results and "value" in results[0]:
        columns["value"] = [r["value"] for r in results]
    else:
        if results and "labels" in results[0]:
            columns["labels"] = [r["labels"] for r in results]
        else:
            columns["label"] = [r["label"] for r in results]
            columns["score"] = [r["score"] for r in results]
        columns["top_k"] = [r["top_k"] for r in results]
        for name in class_names:
            columns[f"prob_{name}"] = [r["probabilities"][name] for r in results]
    columns["precision"] = [precision] * len(results)
    return columns


@contextmanager
def prediction_file(
    path: Path, class_names: list[str], precision: str, kept: list[str] | None = None
) -> Iterator[PredictionWriter]:
    """A writer whose file appears at ``path`` only when the block ends without an error."""
    writer = PredictionWriter(path, class_names, precision, kept)
    with atomic_path(path) as tmp:
        if writer.fmt == "parquet":
            writer._handle = str(tmp)
            try:
                yield writer
            finally:
                if writer._parquet is not None:
                    writer._parquet.close()
            if writer._parquet is None:  # no rows: still a valid (empty) file
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp)
        else:
            with tmp.open("w", encoding="utf-8", newline="") as handle:
                writer._handle = handle
                writer._csv = csv.writer(handle)
                yield writer


def write_predictions(
    path: Path, texts: list[str], results: list[dict[str, Any]], class_names: list[str], precision: str
) -> None:
    """Every prediction to ``path`` at once (see :class:`PredictionWriter` for the columns)."""
    with prediction_file(path, class_names, precision) as writer:
        writer.write(texts, results)


def _csv_rows(texts: list[str], results: list[dict[str, Any]], class_names: list[str]) -> list[list[str]]:
    """The header and one row per text, for whichever task the results are of."""
    probs = [f"prob_{n}" for n in class_names]
    if results and "value" in results[0]:
        return [["text", "value"]] + [[text, f"{row['value']:.6g}"] for text, row in zip(texts, results)]

    def probabilities(row: dict[str, Any]) -> list[str]:
        return [f"{row['probabilities'][n]:.6f}" for n in class_names]

    if results and "labels" in results[0]:
        return [["text", "labels", *probs]] + [
            [text, json.dumps(row["labels"], ensure_ascii=False), *probabilities(row)]
            for text, row in zip(texts, results)
        ]
    return [["text", "label", "score", *probs]] + [
        [text, row["label"], f"{row['score']:.6f}", *probabilities(row)] for text, row in zip(texts, results)
    ]


def result_line(row: dict[str, Any], text: str) -> str:
    """One prediction, tab-separated: label and score (single-label), the labels set (multi-label, with
    the top classes' probabilities) or the value (regression), then the text."""
    if "value" in row:
        return f"{row['value']:.6g}\t{text[:100]}"
    if "labels" in row:
        top = "  ".join(f"{t['label']}={t['score']:.3f}" for t in row["top_k"])
        return f"{','.join(row['labels']) or '-'}\t{text[:100]}\t{top}"
    extra = "  ".join(f"{t['label']}={t['score']:.3f}" for t in row["top_k"][1:])
    return f"{row['label']}\t{row['score']:.4f}\t{text[:100]}" + (f"\t{extra}" if extra else "")
