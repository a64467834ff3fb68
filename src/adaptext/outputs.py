"""Predictions out of `adaptext predict`: a file (CSV or JSONL, written atomically) or lines on stdout."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from adaptext.artifacts import atomic_path
from adaptext.errors import AdaptextError


def write_predictions(
    path: Path, texts: list[str], results: list[dict[str, Any]], class_names: list[str], precision: str
) -> None:
    """CSV or JSONL by extension, written atomically. CSV columns: text, label, score, prob_<class>...
    (single-label); text, labels (a JSON list), prob_<class>... (multi-label); text, value (regression);
    then the precision that computed them (every JSONL row has it too)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise AdaptextError(f"--output {path}: use a .csv or .jsonl file name")
    if not path.resolve().parent.is_dir():
        raise AdaptextError(f"--output {path}: folder {path.resolve().parent} does not exist")
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        if suffix == ".csv":
            writer = csv.writer(handle)
            rows = _csv_rows(texts, results, class_names)
            writer.writerows([rows[0] + ["precision"]] + [row + [precision] for row in rows[1:]])
        else:
            for text, row in zip(texts, results):
                handle.write(json.dumps({"text": text, **row, "precision": precision}, ensure_ascii=False) + "\n")


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
