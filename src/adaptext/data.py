"""Load labelled text from Hub datasets, local files or split directories into plain Python lists.

Everything downstream sees a :class:`TextDataset`: per split a list of texts and a list of labels,
plus the class names in label order and the task. A label is a class id (single-label), a sorted list
of class ids (multi-label) or a float (regression). All input problems are caught here, with a message
that names the file, the rows and the fix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptext import config, options
from adaptext.errors import AdaptextError, names
from adaptext.labels import (
    build_label_names,
    encode_labels,
    guess_task,
    raw_label_sets,
    raw_labels,
    raw_targets,
)
from adaptext.readers import ArrowTexts, Table, load_tables, pick_column, read_table, release_memory, table_texts

LABEL_CANDIDATES = ("label", "labels", "class", "category", "target", "sentiment", "y")


@dataclass
class Split:
    texts: list[str] | ArrowTexts  # a large table's text column stays in Arrow (see readers.ArrowTexts)
    labels: list[Any]  # class ids; lists of class ids (multi-label); floats (regression)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TextDataset:
    """Labelled splits with a shared label space."""

    splits: dict[str, Split]
    class_names: list[str]  # regression: the one target's name (the label column)
    source: str
    notes: list[str] = field(default_factory=list)
    task: str = "single-label"

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------- columns and labels


def table_to_split(
    table: Table,
    text_columns: list[str] | None,
    label_column: str | None,
    class_names: list[str],
    declared: bool,
    label2id: dict[str, int] | None = None,
    task: str = "single-label",
    separator: str | None = None,
) -> Split:
    frame = table.frame
    if len(frame) == 0:
        raise AdaptextError(f"{table.origin} has no rows; give a file with examples")
    texts = table_texts(table, text_columns, arrow=True)
    label_col = pick_column(frame, label_column, LABEL_CANDIDATES, "label", "--label-column", table.origin)
    if task == "regression":
        return Split(texts, raw_targets(frame, label_col, table.origin))
    if task == "multi-label":
        sets = raw_label_sets(frame, label_col, table.origin, separator)
        flat = encode_labels([v for row in sets for v in row], class_names, declared, table.origin, label2id)
        labels, start = [], 0
        for row in sets:
            labels.append(sorted(set(flat[start : start + len(row)])))
            start += len(row)
        return Split(texts, labels)
    labels = encode_labels(raw_labels(frame, label_col, table.origin), class_names, declared, table.origin, label2id)
    return Split(texts, labels)


def table_label_names(
    table: Table, label_column: str | None, task: str = "single-label", separator: str | None = None
) -> tuple[list[str], bool]:
    label_col = pick_column(table.frame, label_column, LABEL_CANDIDATES, "label", "--label-column", table.origin)
    if task == "regression":
        return [label_col], False
    if task == "multi-label":
        raw = [v for row in raw_label_sets(table.frame, label_col, table.origin, separator) for v in row]
        if not raw and not table.class_names:
            raise AdaptextError(f"{table.origin}: no row has a label in {label_col!r}; label some rows")
    else:
        raw = raw_labels(table.frame, label_col, table.origin)
    names = build_label_names(raw, table.class_names, table.origin)
    return names, bool(table.class_names)


def resolve_task(table: Table, label_column: str | None, task: str) -> str:
    """--task auto, decided by the training table's label column (see guess_task)."""
    if task != "auto":
        return task
    label_col = pick_column(table.frame, label_column, LABEL_CANDIDATES, "label", "--label-column", table.origin)
    return guess_task(table.frame, label_col)


# ---------------------------------------------------------------- class balance

# Training data whose largest class has at least this many times the examples of its smallest is
# called imbalanced (a warning at training start suggests the remedies). At 3x a model that never
# answers the small class still scores well on accuracy, and that is when the remedies start to pay.
SKEW_RATIO = 3.0


def class_counts(labels: list[int], class_names: list[str]) -> dict[str, int]:
    """Examples per class present in ``labels``, largest first (ties in label order)."""
    counts = Counter(labels)
    return {class_names[i]: n for i, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))}


def skew(labels: list[int], class_names: list[str]) -> tuple[float, dict[str, int]]:
    """Largest over smallest class count (classes present only) and the counts, largest first."""
    counts = class_counts(labels, class_names)
    if not counts:
        return 1.0, counts
    return max(counts.values()) / min(counts.values()), counts


# ---------------------------------------------------------------- sampling


def stratified_sample(split: Split, size: int | None, seed: int) -> Split:
    """A class-balanced subsample of ``size`` examples (all of them when size >= len)."""
    if size is None or size >= len(split):
        return split
    keep, _ = _stratified_indices(split.labels, size, seed)
    return _pick(split, keep)


def strata(labels: list[Any]) -> list[Any]:
    """What stratified sampling keeps in proportion: the class (single-label); a row's rarest label
    (multi-label; -1 for a row with none), which keeps every label's share close; the quintile of the
    target (regression)."""
    if not labels:
        return []
    if isinstance(labels[0], list):
        frequency = Counter(c for row in labels for c in row)
        return [min(row, key=lambda c: (frequency[c], c)) if row else -1 for row in labels]
    if isinstance(labels[0], float):
        edges = np.unique(np.quantile(np.asarray(labels), [0.2, 0.4, 0.6, 0.8]))
        return np.digitize(labels, edges).tolist()
    return list(labels)


def _stratified_indices(labels: list[Any], first_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into ``first_size`` and the rest, keeping each class's share in both (see strata).

    A class with a single example cannot be shared out (and would stop sklearn from stratifying any
    class): it goes to the first part (the training examples, or the sample), the rest is stratified.
    """
    from sklearn.model_selection import train_test_split

    labels = strata(labels)
    counts = Counter(labels)
    singles = [i for i, label in enumerate(labels) if counts[label] == 1]
    pool = [i for i, label in enumerate(labels) if counts[label] > 1]
    pool_first = first_size - len(singles)
    if not singles or pool_first < 1 or len(pool) - pool_first < 1:
        singles, pool, pool_first = [], list(range(len(labels))), first_size
    pool_labels = [labels[i] for i in pool]
    n_classes = len(set(pool_labels))
    can_stratify = (
        min(Counter(pool_labels).values()) >= 2 and pool_first >= n_classes and len(pool) - pool_first >= n_classes
    )
    first, second = train_test_split(
        pool, train_size=pool_first, random_state=seed, stratify=pool_labels if can_stratify else None
    )
    return sorted(first + singles), sorted(second)


def per_class_sample(split: Split, count: int, seed: int) -> Split:
    """``count`` examples of each class (all of a class that has fewer), drawn with ``seed``; for
    multi-label rows, of each row's rarest label (see strata)."""
    rng = np.random.RandomState(seed)
    by_class: dict[Any, list[int]] = {}
    for index, stratum in enumerate(strata(split.labels)):
        by_class.setdefault(stratum, []).append(index)
    keep = [i for key in sorted(by_class, key=str) for i in _draw(rng, by_class[key], count)]
    return _pick(split, sorted(keep))


def _draw(rng: np.random.RandomState, indices: list[int], count: int) -> list[int]:
    return indices if len(indices) <= count else rng.choice(indices, count, replace=False).tolist()


def carve_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    shareable = sum(1 for n in Counter(strata(split.labels)).values() if n > 1)  # one-example classes stay in train
    n_val = max(shareable, round(len(split) * fraction), 1)
    if len(split) - n_val < 2:
        raise AdaptextError(
            f"only {len(split)} training examples: too few to carve a validation split; "
            "add data or give a validation split"
        )
    train_idx, val_idx = _stratified_indices(split.labels, len(split) - n_val, seed)
    return _pick(split, train_idx), _pick(split, val_idx)


def _pick(split: Split, indices: list[int]) -> Split:
    texts = split.texts
    picked = texts.take(indices) if isinstance(texts, ArrowTexts) else [texts[i] for i in indices]
    return Split(picked, [split.labels[i] for i in indices])


# ---------------------------------------------------------------- entry points


def demo_data_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("adaptext") / "demo_data"))


def load_training_data(cfg: config.TrainConfig) -> TextDataset:
    """Load train/validation(/test) for a TrainConfig, validated and subsampled."""
    spec = cfg.data or str(demo_data_dir())
    tables = load_tables(spec, cfg.data_subset, cfg.encoding)
    if cfg.train_split not in tables:
        raise AdaptextError(f"{spec}: no split {cfg.train_split!r} (found: {names(tables)}); fix --train-split")
    train_table = tables[cfg.train_split]
    task = resolve_task(train_table, cfg.label_column, cfg.task)
    class_names, declared = table_label_names(train_table, cfg.label_column, task, cfg.label_separator)

    def convert(table: Table) -> Split:
        return table_to_split(
            table, cfg.text_column, cfg.label_column, class_names, declared, task=task, separator=cfg.label_separator
        )

    train = convert(train_table)
    notes = [] if cfg.task == task else [f"task: {task} ({_why_task(task)}; --task overrides)"]
    present = _check_train_labels(train, task, class_names, train_table.origin)
    if declared and len(present) < len(class_names):
        missing = [class_names[i] for i in range(len(class_names)) if i not in present]
        notes.append(f"classes with no training example: {names(missing, 20)}")

    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    val_name = cfg.validation_split
    per_class = options.per_class(cfg.train_size)
    if val_name is None:
        val_name = next((n for n in ("validation", "valid", "dev") if n in tables), None)
        if per_class is not None and val_name is not None:  # N/class: every labelled example comes from the sample
            notes.append(f"validation: the {val_name!r} split is not used with --train-size {cfg.train_size} "
                         "(name it with --validation-split to use it)")  # fmt: skip
            val_name = None
    elif val_name not in tables:
        raise AdaptextError(f"{spec}: no split {val_name!r} (found: {names(tables)}); fix --validation-split")

    size = None if per_class is not None else cfg.train_size
    if per_class is not None:  # the whole labelled budget: validation too comes out of it, if anything
        train = per_class_sample(train, per_class, seed)
    validation: Split | None = None
    if val_name is not None:
        train = stratified_sample(train, size, seed)
        validation = convert(tables[val_name])
    elif (
        task == "single-label"  # multi-label thresholds and regression checks are tuned on held-out rows
        and len(train) < cfg.validation_min_train
        and not (per_class is None and cfg.train_size is not None)
    ):
        notes.append(
            f"validation: none carved from {len(train):,} training examples (fewer than --validation-min-train "
            f"{cfg.validation_min_train}): all of them train for a fixed schedule and the final weights are kept"
        )
    elif per_class is not None:
        train, validation = carve_validation(train, cfg.validation_fraction, seed)
        notes.append(f"validation: {len(validation)} examples carved (stratified) from the {cfg.train_size} sample")
    elif cfg.train_size is not None and len(train) - cfg.train_size >= 2 * len(present):
        # Keep the full --train-size budget for training; validate on examples it did not draw.
        train_idx, rest_idx = _stratified_indices(train.labels, cfg.train_size, seed)
        train, rest = _pick(train, train_idx), _pick(train, rest_idx)
        n_val = cfg.eval_size or max(round(len(train) * cfg.validation_fraction), min(200, len(rest)))
        validation = stratified_sample(rest, n_val, seed)
        notes.append(
            f"validation: {len(validation)} examples drawn (stratified) from the training file, "
            f"none of them among the {len(train):,} training examples"
        )
    else:
        train = stratified_sample(train, size, seed)
        train, validation = carve_validation(train, cfg.validation_fraction, seed)
        notes.append(f"validation: {len(validation)} examples carved (stratified) from train")
    splits = {"train": train}
    if validation is not None:
        splits["validation"] = stratified_sample(validation, cfg.eval_size, seed)
    if "test" in tables and cfg.train_split != "test":
        splits["test"] = stratified_sample(convert(tables["test"]), cfg.test_size, seed)
    if task != "regression":
        _check_unseen(splits, class_names)
    del tables, train_table  # a large table's columns: its texts live on in the splits (ArrowTexts) only
    release_memory()
    return TextDataset(splits, class_names, spec, notes, task)


def _why_task(task: str) -> str:
    return {
        "multi-label": "the label cells are lists",
        "regression": "the labels are non-integer numbers",
        "single-label": "one label per row",
    }[task]


def _check_train_labels(train: Split, task: str, class_names: list[str], origin: str) -> list[int]:
    """The training labels can teach something: two classes, a label somewhere, a target that varies.
    Returns the class ids present."""
    if task == "regression":
        if len(set(train.labels)) < 2:
            raise AdaptextError(f"{origin}: every training target is {train.labels[0]:g}; regression needs variation")
        return [0]
    if task == "multi-label":
        present = sorted({c for row in train.labels for c in row})
        if not present:
            raise AdaptextError(f"{origin}: no training example has a label; multi-label training needs some")
        return present
    present = sorted(set(train.labels))
    if len(present) < 2:
        raise AdaptextError(
            f"{origin}: every training example has the same label "
            f"({class_names[present[0]]!r}); classification needs at least two classes"
        )
    return present


def _label_ids(labels: list[Any]) -> set[int]:
    return {c for row in labels for c in row} if labels and isinstance(labels[0], list) else set(labels)


def _check_unseen(splits: dict[str, Split], class_names: list[str]) -> None:
    seen = _label_ids(splits["train"].labels)
    for name, split in splits.items():
        unseen = sorted(_label_ids(split.labels) - seen)
        if unseen:
            shown = ", ".join(repr(class_names[i]) for i in unseen[:5])
            raise AdaptextError(
                f"{name} split has labels {shown} that never occur in the training data; "
                "add training examples of those classes or drop those rows"
            )


def load_eval_split(
    spec: str,
    split: str | None,
    class_names: list[str],
    text_column: list[str] | None,
    label_column: str | None,
    subset: str | None = None,
    encoding: str = "utf-8",
    task: str = "single-label",
    separator: str | None = None,
) -> Split:
    """Load one split for evaluation against a trained model's label space (and task)."""
    tables = load_tables(spec, subset, encoding)
    if split is None:
        split = next((s for s in ("test", "validation", "train") if s in tables), next(iter(tables)))
    if split not in tables:
        raise AdaptextError(f"{spec}: no split {split!r} (found: {names(tables)}); fix --split")
    table = tables[split]
    if table.class_names and table.class_names != class_names and task != "regression":
        raise AdaptextError(
            f"{table.origin}: its classes ({names(table.class_names, 8)}) differ from the "
            f"model's ({names(class_names, 8)}); evaluate on data with the model's label set"
        )
    declared = True
    # Labels given as strings are looked up by class name; ints index the model's classes.
    return table_to_split(table, text_column, label_column, class_names, declared, task=task, separator=separator)


def read_texts(path: str, text_columns: list[str] | None = None, encoding: str = "utf-8") -> list[str]:
    """Texts to classify from a CSV/TSV/JSON/JSONL/Parquet file (labels, if any, are ignored)."""
    return table_texts(read_table(Path(path), encoding), text_columns)
