"""Texts to classify, read in chunks: one file, a folder or a glob of CSV/TSV/JSONL/Parquet files.

Bulk prediction must not hold its input in memory: each file is read a chunk of rows at a time
(Parquet record batches, CSV and JSONL line by line), and a chunk never spans two files, so the chunk
boundaries depend only on the file list and ``chunk_rows`` (what makes ``--resume`` exact). CSV and
JSONL are decoded a line at a time, so a bad byte or a broken row is reported with its file and row.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd

from adaptext.errors import AdaptextError, names
from adaptext.readers import EXTENSIONS, TEXT_CANDIDATES, Table, pick_column, read_table, table_texts

CHUNK_ROWS = 4096


@dataclass
class Chunk:
    """Up to ``chunk_rows`` consecutive rows of one file."""

    index: int  # chunk number over the whole input, from 0
    first_row: int  # input row (over all files) of its first text
    texts: list[str]
    kept: dict[str, list[Any]] = field(default_factory=dict)  # --keep-columns, as read

    def __len__(self) -> int:
        return len(self.texts)


def input_files(spec: str) -> list[Path]:
    """``spec`` as files: itself, a folder's readable files (sorted), or a glob's matches (sorted)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not found:
            raise AdaptextError(f"--input {spec}: the folder holds no {'/'.join(EXTENSIONS)} files")
        return found
    if glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not found:
            raise AdaptextError(f"--input {spec}: the pattern matches no files; check it")
        unreadable = [p.name for p in found if p.suffix.lower() not in EXTENSIONS]
        if unreadable:
            raise AdaptextError(
                f"--input {spec}: matches {names(unreadable)}, not {'/'.join(EXTENSIONS)}; narrow the pattern"
            )
        return found
    raise AdaptextError(f"--input {spec} not found; give a file, a folder or a glob such as 'texts/*.parquet'")


class Source:
    """The input of a bulk prediction: its files, their total size, and its rows as chunks."""

    def __init__(
        self,
        spec: str,
        text_columns: list[str] | None = None,
        keep_columns: list[str] | None = None,
        encoding: str = "utf-8",
        chunk_rows: int = CHUNK_ROWS,
    ):
        if chunk_rows < 1:
            raise AdaptextError(f"--chunk-rows {chunk_rows}: give 1 or more rows")
        self.spec = spec
        self.files = input_files(spec)
        self.text_columns = text_columns
        self.keep_columns = keep_columns or []
        self.encoding = encoding
        self.chunk_rows = chunk_rows
        self.bytes_done = 0  # bytes of input consumed so far (for progress on files of unknown row count)
        self.total_bytes = sum(p.stat().st_size for p in self.files)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must find unchanged: each file's path, size and modification time, and how
        the input is cut and read."""
        files = [
            {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in self.files
        ]
        return {"files": files, "chunk_rows": self.chunk_rows, "text_columns": self.text_columns,
                "keep_columns": self.keep_columns, "encoding": self.encoding}  # fmt: skip

    def total_rows(self) -> int | None:
        """Known without reading the data for Parquet (its footer); None when any file is text."""
        if any(p.suffix.lower() != ".parquet" for p in self.files):
            return None
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)
        except Exception:  # noqa: BLE001 — a damaged file: reading it reports it, with its name
            return None

    def chunks(self) -> Iterator[Chunk]:
        index, row, done_bytes = 0, 0, 0
        for path in self.files:
            for frame, first in _frames(path, self.chunk_rows, self.encoding, self._needed):
                chunk = self._chunk(frame, path, index, row, first)
                self.bytes_done = done_bytes + _position(frame)
                yield chunk
                index += 1
                row += len(frame)
            done_bytes += path.stat().st_size
            self.bytes_done = done_bytes

    def _needed(self, columns: list[str], path: Path) -> list[str]:
        """The columns to read from a file with these columns: the text column(s) and the kept ones; one
        line naming the file when one is missing."""
        frame = pd.DataFrame(columns=columns)
        text = self.text_columns or [pick_column(frame, None, TEXT_CANDIDATES, "text", "--text-column", str(path))]
        missing = [c for c in text + self.keep_columns if c not in columns]
        if missing:
            flag = "--keep-columns" if set(missing) <= set(self.keep_columns) - set(text) else "--text-column"
            raise AdaptextError(f"{path}: no column {names(missing)} (columns: {names(columns, 20)}); fix {flag}")
        return list(dict.fromkeys(text + self.keep_columns))

    def _chunk(self, frame: pd.DataFrame, path: Path, index: int, row: int, first: int) -> Chunk:
        text_columns = self.text_columns or [
            pick_column(frame, None, TEXT_CANDIDATES, "text", "--text-column", str(path))
        ]
        texts = table_texts(Table(frame, None, str(path)), text_columns, first_row=first)
        return Chunk(index, row, texts, {c: frame[c].tolist() for c in self.keep_columns})


def _position(frame: pd.DataFrame) -> int:
    return int(frame.attrs.get("end_byte", 0))


def _frames(path: Path, chunk_rows: int, encoding: str, needed: Any) -> Iterator[tuple[pd.DataFrame, int]]:
    """(frame of at most chunk_rows rows, the file row of its first) over one file; ``frame.attrs
    ['end_byte']`` is how far into the file the frame ends (progress)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_frames(path, chunk_rows, needed)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_frames(path, chunk_rows, encoding, needed, tsv=suffix == ".tsv")
    elif suffix == ".json" and _starts_with_array(path, encoding):
        table = read_table(path, encoding)  # a JSON array is one value: it is read whole (use JSONL to stream)
        columns = needed([str(c) for c in table.frame.columns], path)
        for start in range(0, len(table.frame), chunk_rows):
            frame = table.frame.iloc[start : start + chunk_rows][columns].reset_index(drop=True)
            frame.attrs["end_byte"] = path.stat().st_size * min(1.0, (start + chunk_rows) / len(table.frame))
            yield frame, start
    else:
        yield from _jsonl_frames(path, chunk_rows, encoding, needed)


def _parquet_frames(path: Path, chunk_rows: int, needed: Any) -> Iterator[tuple[pd.DataFrame, int]]:
    import pyarrow.parquet as pq

    try:
        # pre_buffer (pyarrow's default) keeps every row group's buffers it has read until the file is closed:
        # memory grew with the file (1M rows: +124 MB of Arrow buffers); off, it stays flat (5 MB).
        handle = pq.ParquetFile(path, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several error types for a damaged footer
        raise AdaptextError(
            f"{path} could not be read as Parquet ({_first_line(exc)}); fix or remove the file"
        ) from None
    columns = needed(handle.schema_arrow.names, path)
    total, start = max(handle.metadata.num_rows, 1), 0
    size = path.stat().st_size
    try:
        for batch in handle.iter_batches(batch_size=chunk_rows, columns=columns):
            frame = batch.to_pandas()
            frame.attrs["end_byte"] = int(size * (start + len(frame)) / total)
            yield frame, start
            start += len(frame)
    except AdaptextError:
        raise
    except Exception as exc:
        raise AdaptextError(
            f"{path}: unreadable after row {start:,} ({_first_line(exc)}); fix or remove the file"
        ) from None


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str, int]]:
    """(line number from 1, decoded line, byte offset after it); a bad byte is one line naming its line."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        handle: IO[bytes] = path.open("rb")
    except OSError as exc:
        raise AdaptextError(f"{path}: cannot be read ({exc.strerror}); check the path and permissions") from None
    with handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            offset += len(raw)
            try:
                line = decoder.decode(raw)
                if number == 1:
                    line = line.lstrip("\ufeff")
            except UnicodeDecodeError as exc:
                raise AdaptextError(
                    f"{path}: line {number} is not valid {encoding} (bad byte at column {exc.start + 1}); "
                    "re-save the file as UTF-8 or pass --encoding (e.g. latin-1)"
                ) from None
            yield number, line, offset


def _csv_frames(
    path: Path, chunk_rows: int, encoding: str, needed: Any, tsv: bool
) -> Iterator[tuple[pd.DataFrame, int]]:
    # Every cell stays a string (pandas would read "007" as 7); only an empty cell is missing, as in training.
    lines = _lines(path, encoding)
    where = {"line": 0, "offset": 0}

    def text_lines() -> Iterator[str]:
        for number, line, offset in lines:
            where["line"], where["offset"] = number, offset
            yield line

    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ","}
    reader = csv.reader(text_lines(), **dialect)
    try:
        header = next(reader)
    except StopIteration:
        raise AdaptextError(f"{path} is empty; give a file with a header row and texts") from None
    columns = needed(header, path)
    picks = [header.index(c) for c in columns]
    rows: list[list[str]] = []
    start = 0
    try:
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise AdaptextError(
                    f"{path}: row {start + len(rows):,} (line {where['line']}) has {len(record)} fields, the header "
                    f"{len(header)}; check the quoting and separators"
                )
            rows.append([record[i] if record[i] != "" else None for i in picks])
            if len(rows) == chunk_rows:
                yield _frame(rows, columns, where["offset"]), start
                start, rows = start + len(rows), []
    except csv.Error as exc:
        raise AdaptextError(f"{path}: line {where['line']} could not be parsed as CSV ({exc}); fix the file") from None
    if rows:
        yield _frame(rows, columns, where["offset"]), start


def _jsonl_frames(path: Path, chunk_rows: int, encoding: str, needed: Any) -> Iterator[tuple[pd.DataFrame, int]]:
    records: list[dict[str, Any]] = []
    columns: list[str] | None = None
    start, offset = 0, 0
    for number, line, offset in _lines(path, encoding):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AdaptextError(f"{path}: line {number} is not valid JSON ({exc.msg}); fix that line") from None
        if not isinstance(record, dict):
            raise AdaptextError(f"{path}: line {number} is not a JSON object; give one object per line")
        if columns is None:
            columns = needed([str(k) for k in record], path)
        row = {c: record.get(c) for c in columns}
        for column, value in row.items():
            if isinstance(value, str) and not _encodable(value):
                raise AdaptextError(
                    f"{path}: line {number} holds a lone surrogate escape in {column!r} (e.g. \\udc80), which "
                    "is not text; fix that line"
                )
        records.append(row)
        if len(records) == chunk_rows:
            yield _frame(records, columns, offset), start
            start, records = start + len(records), []
    if columns is None:
        raise AdaptextError(f"{path} is empty; give one JSON object per line")
    if records:
        yield _frame(records, columns, offset), start


def _frame(rows: list[Any], columns: list[str], end_byte: int) -> pd.DataFrame:
    frame = (
        pd.DataFrame.from_records(rows, columns=columns)
        if rows and isinstance(rows[0], dict)
        else pd.DataFrame(rows, columns=columns)
    )
    frame.attrs["end_byte"] = end_byte
    return frame


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _starts_with_array(path: Path, encoding: str) -> bool:
    with path.open("r", encoding=encoding, errors="replace") as handle:
        head = handle.read(4096).lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
