"""Reading a table's cells: one column's values as plain Python, and label columns as class names,
label sets (multi-label) or numbers (regression), each problem refused in one line that names the
file, the rows and the fix. adaptext.data builds the splits from them."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from adaptext.errors import AdaptextError, names


def blank_rows(values: list[Any]) -> list[int]:
    """Indices of missing (None/NaN) or whitespace-only cells."""
    return [
        i
        for i, v in enumerate(values)
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())
    ]


def shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cells(
    frame: pd.DataFrame, column: str, origin: str, what: str, lists: bool = False, first_row: int = 0
) -> list[Any]:
    """A column's cells as plain Python scalars: numpy scalars unwrapped, bytes (Parquet binary columns)
    decoded as UTF-8; a list, array or mapping in a cell (a multi-label or nested file) is refused unless
    ``lists`` (multi-label labels), which passes lists and arrays on as lists."""
    out = []
    for row, value in enumerate(frame[column].tolist(), start=first_row):
        if isinstance(value, (bytes, bytearray)):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise AdaptextError(
                    f"{origin}: row {row} of {column!r} holds bytes that are not UTF-8 text ({shorten(value)}); "
                    "store that column as UTF-8 strings"
                ) from None
        elif lists and isinstance(value, (list, tuple, np.ndarray)):
            value = [v.item() if isinstance(v, np.generic) else v for v in value]
        elif isinstance(value, (list, tuple, dict, set, np.ndarray)):
            kind = "mapping" if isinstance(value, dict) else "list"
            fix = "give each row one label, or pass --task multi-label for a set of labels per row"
            raise AdaptextError(
                f"{origin}: row {row} of {column!r} holds a {kind} ({shorten(value)}), not a single {what}; "
                + (fix if what == "label" else "give one string per row")
            )
        elif isinstance(value, np.generic):
            value = value.item()
        out.append(value)
    return out


def filled_cells(frame: pd.DataFrame, column: str, origin: str, missing: str, fix: str) -> list[Any]:
    """A label column's cells (see cells), refusing missing or blank ones in one line."""
    values = cells(frame, column, origin, "label")
    bad = blank_rows(values)
    if bad:
        raise AdaptextError(
            f"{origin}: {len(bad)} row(s) have {missing} in {column!r} (first at row {bad[0]}); "
            f"remove or {fix} those rows"
        )
    return values


def raw_labels(frame: pd.DataFrame, column: str, origin: str) -> list[Any]:
    values = filled_cells(frame, column, origin, "no label", "label")
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, float):
            raise AdaptextError(
                f"{origin}: label {v!r} in {column!r} is not a class; classification needs integer or string labels "
                "(pass --task regression to predict numbers)"
            )
        out.append(v.strip() if isinstance(v, str) else v)
    return out


def _is_list_cell(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def guess_task(frame: pd.DataFrame, column: str) -> str:
    """The task a label column implies: lists -> multi-label; non-integer numbers -> regression."""
    values = [v for v in frame[column].tolist() if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if any(_is_list_cell(v) for v in values):
        return "multi-label"
    numbers = [v.item() if isinstance(v, np.generic) else v for v in values]
    if numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        if any(isinstance(v, float) and not v.is_integer() for v in numbers):
            return "regression"
    return "single-label"


def raw_label_sets(frame: pd.DataFrame, column: str, origin: str, separator: str | None) -> list[list[Any]]:
    """Multi-label cells as lists: list cells as they are, strings split at ``separator`` (or read as a
    JSON / Python list literal, as pandas writes list columns to CSV). Blank cells and ``[]`` are rows
    with no label."""
    out = []
    for row, value in enumerate(cells(frame, column, origin, "label", lists=True)):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = []
        elif isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                value = _list_literal(text, origin, column, row)
            elif separator is not None:
                value = text.split(separator)
            elif text:
                value = [text]
            else:
                value = []
        elif not isinstance(value, list):
            value = [value]
        labels = []
        for item in value:
            if isinstance(item, float) and item.is_integer():
                item = int(item)
            if isinstance(item, str):
                item = item.strip()
                if not item:
                    continue
            if isinstance(item, (float, list, dict)) or item is None:
                raise AdaptextError(
                    f"{origin}: row {row} of {column!r} has {shorten(item)} in its label list; "
                    "labels are class names or integer ids"
                )
            labels.append(item)
        out.append(labels)
    return out


def _list_literal(text: str, origin: str, column: str, row: int) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise AdaptextError(
                f"{origin}: row {row} of {column!r} looks like a list but does not parse ({shorten(text)}); "
                'write it as a JSON list, e.g. ["a", "b"]'
            ) from None
    if not isinstance(value, (list, tuple)):
        raise AdaptextError(f"{origin}: row {row} of {column!r} is not a list of labels ({shorten(text)})")
    return list(value)


def raw_targets(frame: pd.DataFrame, column: str, origin: str) -> list[float]:
    """Regression targets: finite numbers (numeric strings accepted), every row."""
    values = filled_cells(frame, column, origin, "no value", "fill")
    out = []
    for row, v in enumerate(values):
        try:
            number = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise AdaptextError(
                f"{origin}: row {row} of {column!r} holds {shorten(v)}, not a finite number; "
                "regression needs a number per row (or pass --task single-label for classes)"
            )
        out.append(number)
    return out


def build_label_names(raw: list[Any], declared: list[str] | None, origin: str) -> list[str]:
    """Class names in label order: declared names if any, else the sorted distinct labels."""
    if declared:
        return list(declared)
    # Distinct by the name a label is known by (1 and "1" are one class; True and 1 are two, though
    # True == 1 in Python); numbers in numeric order first, then the rest by name.
    by_name: dict[str, Any] = {}
    for v in raw:
        if str(v) not in by_name or _is_number(v):
            by_name[str(v)] = v
    order = sorted(by_name.items(), key=lambda item: (0, item[1], "") if _is_number(item[1]) else (1, 0, item[0]))
    return [name for name, _ in order]


def _is_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode_labels(
    raw: list[Any], class_names: list[str], declared: bool, origin: str, label2id: dict[str, int] | None = None
) -> list[int]:
    """Map raw labels to ids: by class name first, else (declared names only) as an index."""
    lookup = label2id or {name: i for i, name in enumerate(class_names)}
    ids, unknown = [], []
    for v in raw:
        if str(v) in lookup:
            ids.append(lookup[str(v)])
        elif declared and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(class_names):
            ids.append(v)
        else:
            unknown.append(v)
    if unknown:
        shown = ", ".join(repr(v) for v in sorted(set(map(str, unknown)))[:5])
        raise AdaptextError(
            f"{origin}: labels {shown} are not among the training classes "
            f"({names(class_names)}); fix those rows or train on data that has them"
        )
    return ids
