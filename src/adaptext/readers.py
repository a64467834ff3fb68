"""Read labelled tables from files, split folders and the Hugging Face Hub (``datasets``).

Each reader returns a DataFrame plus the class names the source declares (Parquet metadata,
``classes.json`` or a ``ClassLabel``), and turns every parse failure into one AdaptextError line.
"""

from __future__ import annotations

import csv
import ctypes
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from adaptext.errors import AdaptextError
from adaptext.errors import names as names_of
from adaptext.labels import blank_rows, cells

TEXT_CANDIDATES = ("text", "sentence", "content", "review", "document", "question", "body", "tweet")
# A text this long is a broken file, not a document: refuse it instead of tokenising megabytes.
MAX_TEXT_CHARS = 1_000_000
try:  # glibc's malloc_trim (Linux); elsewhere nothing to call
    _LIBC: Any = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 — present on glibc only
except (OSError, AttributeError):
    _LIBC = None
# From this many rows a single text column stays one Arrow array (see ArrowTexts) instead of a Python string
# per row: at a million texts the strings alone cost ~1 GB more than their bytes.
ARROW_TEXTS_MIN_ROWS = 50_000
EXTENSIONS = (".parquet", ".csv", ".tsv", ".jsonl", ".json")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


@dataclass
class Table:
    frame: pd.DataFrame
    class_names: list[str] | None
    origin: str


def _read_classes_json(folder: Path) -> list[str] | None:
    path = folder / "classes.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdaptextError(f"{path} is not valid JSON; fix it or remove it") from None
    names = value.get("names") if isinstance(value, dict) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AdaptextError(f'{path} must be {{"names": [...]}} or a JSON list of class names')
    return _check_class_names(names, str(path))


def _check_class_names(names: list[str], where: str) -> list[str]:
    """Declared class names: at least two, distinct, not blank (a label id indexes them)."""
    if len(names) < 2:
        raise AdaptextError(f"{where}: declares {len(names)} class name(s); classification needs at least two")
    if any(not n.strip() for n in names):
        raise AdaptextError(f"{where}: declares a blank class name; give every class a name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdaptextError(f"{where}: declares the class name(s) {names_of(repeated)} more than once; list each once")
    return names


def read_table(path: Path, encoding: str = "utf-8") -> Table:
    """Read one file into a DataFrame, with class names from Parquet metadata or classes.json."""
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise AdaptextError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(EXTENSIONS)}")
    class_names = None
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if b"class_names" in meta:
                class_names = json.loads(meta[b"class_names"])
                if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
                    raise AdaptextError(f"{path}: its 'class_names' metadata must be a JSON list of strings")
                class_names = _check_class_names(class_names, f"{path} (class_names metadata)")
            frame = table.to_pandas()
        elif suffix in (".csv", ".tsv"):
            # Only truly empty cells are missing: a text that reads "NA" or "null" is still text.
            sep, quoting = ("\t", csv.QUOTE_NONE) if suffix == ".tsv" else (",", csv.QUOTE_MINIMAL)
            frame = pd.read_csv(
                path,
                sep=sep,
                quoting=quoting,
                encoding=encoding,
                keep_default_na=False,
                na_values=[""],
            )
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, encoding=encoding, dtype=False, convert_axes=False)
        else:
            try:
                frame = pd.read_json(path, encoding=encoding, dtype=False, convert_axes=False)
            except ValueError:
                frame = pd.read_json(path, lines=True, encoding=encoding, dtype=False, convert_axes=False)
    except UnicodeDecodeError as exc:
        raise AdaptextError(
            f"{path} is not valid {encoding} (bad byte at position {exc.start}); "
            "re-save it as UTF-8 or pass --encoding (e.g. latin-1)"
        ) from None
    except pd.errors.EmptyDataError:
        raise AdaptextError(f"{path} is empty; give a file with a header row and examples") from None
    except FileNotFoundError:
        raise AdaptextError(f"{path} not found; check the path") from None
    except AdaptextError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many parser error types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise AdaptextError(f"{path} could not be parsed as {suffix[1:]} ({first}); fix the file") from None
    frame.columns = [str(c) for c in frame.columns]  # columns are named by strings (--text-column)
    return Table(frame, class_names or _read_classes_json(path.parent), str(path))


def find_split_files(folder: Path) -> dict[str, Path]:
    """Map split name -> file for a folder like ../shared/data/ag_news (train.parquet, test.parquet)."""
    found: dict[str, Path] = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            for ext in EXTENSIONS:
                candidate = folder / f"{alias}{ext}"
                if candidate.is_file() and split not in found:
                    found[split] = candidate
    return found


def _load_hub(name: str, subset: str | None) -> dict[str, Table]:
    try:
        import datasets

        loaded = datasets.load_dataset(name, subset)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise AdaptextError(
            f"cannot load dataset {name!r}: it is not a local file or directory and the Hugging Face "
            f"Hub could not provide it ({first}); check the name or pass a local path"
        ) from None
    tables = {}
    for split_name, split in loaded.items():
        names = None
        for feature in split.features.values():
            if type(feature).__name__ == "ClassLabel":
                names = list(feature.names)
        tables[split_name] = Table(split.to_pandas(), names, f"{name}[{split_name}]")
    return tables


def load_tables(spec: str, subset: str | None = None, encoding: str = "utf-8") -> dict[str, Table]:
    """Resolve ``--data``: directory of split files, single file (as 'train'), or Hub dataset."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = find_split_files(path)
        if not files:
            raise AdaptextError(
                f"{path} holds no split files; expected train.* (and optionally validation.*, "
                f"test.*) with one of {', '.join(EXTENSIONS)}"
            )
        return {split: read_table(file, encoding) for split, file in files.items()}
    if path.is_file():
        return {"train": read_table(path, encoding)}
    if path.suffix.lower() in EXTENSIONS or spec.startswith((".", "/", "~")):
        raise AdaptextError(f"data file {spec!r} not found; check the path given to --data")
    return _load_hub(spec, subset)


# ---------------------------------------------------------------- columns


def pick_column(
    frame: pd.DataFrame, wanted: str | None, candidates: tuple[str, ...], what: str, flag: str, origin: str
) -> str:
    columns = [str(c) for c in frame.columns]
    if wanted is not None:
        if wanted not in columns:
            raise AdaptextError(f"{origin}: no {what} column {wanted!r} (columns: {names_of(columns, 20)}); fix {flag}")
        return wanted
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise AdaptextError(
        f"{origin}: cannot tell which column holds the {what} (columns: {names_of(columns, 20)}); pass {flag}"
    )


def texts_of(frame: pd.DataFrame, columns: list[str], origin: str, first_row: int = 0) -> list[str]:
    """The columns' cells joined by spaces, one text per row; rows are numbered from ``first_row`` in errors
    (a chunk of a file read in parts)."""
    parts = []
    for column in columns:
        values = cells(frame, column, origin, "text", first_row=first_row)
        bad = blank_rows(values)
        if bad:
            raise AdaptextError(
                f"{origin}: {len(bad)} row(s) have an empty or missing {column!r} (first at row "
                f"{bad[0] + first_row}); remove or fill those rows"
            )
        parts.append([v if isinstance(v, str) else str(v) for v in values])
    texts = [" ".join(row) for row in zip(*parts)]
    for i, text in enumerate(texts):
        if len(text) > MAX_TEXT_CHARS:
            raise AdaptextError(
                f"{origin}: row {i + first_row} is {len(text):,} characters long (limit {MAX_TEXT_CHARS:,}); "
                "that is not one document: check the file's quoting and separators"
            )
    return texts


class ArrowTexts(Sequence[str]):
    """Texts held as one Arrow string array (their UTF-8 bytes and an offset each), read like a list.

    Indexing gives a Python string; slices and ``take`` give another ArrowTexts; iterating converts a
    block at a time. Training on a large table keeps its texts this way until they are tokenised.
    """

    BLOCK = 4096

    def __init__(self, array: pa.Array | pa.ChunkedArray) -> None:
        self.array = array  # chunks as read: combining them would copy every text once more

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return ArrowTexts(self.array.slice(start, max(stop - start, 0)))
            return self.take(range(start, stop, step))
        return self.array[index].as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), self.BLOCK):
            yield from self.array.slice(start, self.BLOCK).to_pylist()

    def take(self, indices: Any) -> ArrowTexts:
        taken = self.array.take(pa.array(np.asarray(indices, dtype=np.int64)))
        return ArrowTexts(taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken)

    def to_list(self) -> list[str]:
        return self.array.to_pylist()


def _arrow_texts(frame: pd.DataFrame, column: str, origin: str, first_row: int) -> ArrowTexts | None:
    """The column as ArrowTexts, checked like ``texts_of`` checks lists, when it is a large Arrow-backed
    string column (pandas 3 reads strings so); None otherwise."""
    series = frame[column]
    dtype = series.dtype
    if len(frame) < ARROW_TEXTS_MIN_ROWS or not (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"):
        return None
    array = series.array.__arrow_array__()  # the column's own Arrow chunks, not a copy
    blank = pc.or_kleene(array.is_null(), pc.equal(pc.utf8_trim_whitespace(array), ""))
    bad = np.flatnonzero(blank.fill_null(True).to_numpy(zero_copy_only=False))
    if len(bad):
        raise AdaptextError(
            f"{origin}: {len(bad)} row(s) have an empty or missing {column!r} (first at row "
            f"{bad[0] + first_row}); remove or fill those rows"
        )
    lengths = pc.utf8_length(array).to_numpy(zero_copy_only=False)
    long = np.flatnonzero(lengths > MAX_TEXT_CHARS)
    if len(long):
        i = int(long[0])
        raise AdaptextError(
            f"{origin}: row {i + first_row} is {int(lengths[i]):,} characters long (limit {MAX_TEXT_CHARS:,}); "
            "that is not one document: check the file's quoting and separators"
        )
    return ArrowTexts(array)


def table_texts(
    table: Table, text_columns: list[str] | None, first_row: int = 0, arrow: bool = False
) -> list[str] | ArrowTexts:
    """The text of every row: the named columns joined, or the auto-detected text column (errors number
    the rows from ``first_row``). With ``arrow``, a large single Arrow-backed column comes as ArrowTexts."""
    columns = text_columns or [pick_column(table.frame, None, TEXT_CANDIDATES, "text", "--text-column", table.origin)]
    for column in columns:
        pick_column(table.frame, column, TEXT_CANDIDATES, "text", "--text-column", table.origin)
    if arrow and len(columns) == 1:
        arrow_texts = _arrow_texts(table.frame, columns[0], table.origin, first_row)
        if arrow_texts is not None:
            return arrow_texts
    return texts_of(table.frame, columns, table.origin, first_row)


def release_memory() -> None:
    """Hand freed memory back to the system: Arrow's pool and glibc's heap keep what was freed for reuse,
    so a large table read and dropped would otherwise stay in the resident set."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
