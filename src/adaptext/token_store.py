"""A training split's token ids as two flat arrays, in memory or mapped from an on-disk token cache.

As Python lists, a million tokenised texts cost ~2 GB (a list and an int object per token); here they
cost 2 bytes a token (4 for vocabularies of 65,536 and more) plus an offset per row. A split of
``CACHE_MIN_TEXTS`` texts or more (every split with ``--token-cache on``) is written once to
``<cache_root()>/<key>/`` and memory-mapped; the key is a hash of the texts themselves (in
order), the tokenizer (its full definition) and the windowing settings (``--max-length``,
``--long-text``, the window options), so a later run, a ``compare`` arm or a ``tune`` trial on the same
texts maps the files instead of tokenising again, and any change to one of those makes a new entry.
Entries are written under a temporary name and renamed when complete: a killed run leaves no entry
that looks finished, and two processes building the same entry keep the first.

Tokenisation itself is the fast tokenizer's batch encoding, which runs on every core (Rust threads;
``TOKENIZERS_PARALLELISM=false`` turns that off).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from adaptext.artifacts import write_json
from adaptext.models import cache_dir
from adaptext.windows import TextRows, Windowing

FORMAT = 1
CACHE_MIN_TEXTS = 10_000  # below this, tokenising takes about a second: not worth a cache entry
HASH_BLOCK = 8192


class TokenRows(Sequence[list[int]]):
    """Rows of token ids stored flat (``flat[offsets[i]:offsets[i + 1]]`` is row i), read like a list of lists."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = flat
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self.flat[self.offsets[index] : self.offsets[index + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            yield self.flat[self.offsets[i] : self.offsets[i + 1]].tolist()

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def token_dtype(tokenizer: Any) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def encode(
    windowing: Windowing,
    tokenizer: Any,
    texts: Sequence[str],
    cache: str = "auto",
    echo: Callable[[str], None] | None = None,
    what: str = "texts",
) -> TextRows:
    """The model rows of ``texts`` (as ``Windowing.encode``) with flat token ids: read from the token
    cache when an entry exists, else tokenised (and, for a large split or ``cache="on"``, cached)."""
    if cache == "off" or (cache == "auto" and len(texts) < CACHE_MIN_TEXTS):
        return _in_memory(windowing, tokenizer, texts)
    root = cache_root()
    started = time.perf_counter()
    key = cache_key(windowing, tokenizer, texts)
    entry = root / key
    rows = _open(entry, len(texts))
    if rows is not None:
        if echo:
            echo(f"tokens: {len(texts):,} {what} read from the token cache ({entry}); tokenisation skipped")
        return rows
    rows = _build(entry, windowing, tokenizer, texts)
    if echo:
        echo(f"tokens: {len(texts):,} {what} tokenised in {time.perf_counter() - started:.1f} s, cached in {entry}")
    return rows


def cache_root() -> Path:
    """``$ADAPTEXT_TOKEN_CACHE``, else ``$ADAPTEXT_CACHE/tokens`` (default ``~/.cache/adaptext/tokens``)."""
    if os.environ.get("ADAPTEXT_TOKEN_CACHE"):
        return Path(os.environ["ADAPTEXT_TOKEN_CACHE"])
    return cache_dir() / "tokens"


def cache_key(windowing: Windowing, tokenizer: Any, texts: Sequence[str]) -> str:
    """A hash of the texts in order, the tokenizer's definition and the windowing settings."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps({"format": FORMAT, "windowing": windowing.describe()}, sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for start in range(0, len(texts), HASH_BLOCK):
        block = texts[start : start + HASH_BLOCK]
        block = block if isinstance(block, list) else list(block)
        digest.update(np.asarray([len(t) for t in block], dtype=np.int64).tobytes())
        digest.update("".join(block).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the ids: the fast tokenizer's full JSON definition (vocabulary, normaliser, special
    tokens), else the class, vocabulary and special tokens; and the library versions."""
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Less the truncation and padding state, which each call sets (the ids are cut per call here).
        state = json.loads(backend.to_str())
        definition = json.dumps({k: v for k, v in state.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        definition = json.dumps(
            {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
        )
    parts = [type(tokenizer).__name__, definition, str(tokenizer.pad_token_id), str(tokenizer.eos_token_id),
             transformers.__version__, tokenizers.__version__]  # fmt: skip
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=20).hexdigest()


def _in_memory(windowing: Windowing, tokenizer: Any, texts: Sequence[str]) -> TextRows:
    flats, lengths, index = [], [], []
    for flat, counts, text_index in _array_chunks(windowing, tokenizer, texts):
        flats.append(flat)
        lengths.append(counts)
        index.append(text_index)
    flat = np.concatenate(flats) if flats else np.zeros(0, token_dtype(tokenizer))
    return _rows(flat, _offsets(lengths), index, len(texts), windowing.sliding)


def _array_chunks(
    windowing: Windowing, tokenizer: Any, texts: Sequence[str]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per block of texts (``Windowing.chunks``): its rows' ids end to end, tokens per row, and the text of
    each row, as arrays."""
    dtype = token_dtype(tokenizer)
    for ids, text_index in windowing.chunks(tokenizer, texts):
        yield (
            np.fromiter(chain.from_iterable(ids), dtype=dtype),
            np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids)),
            np.asarray(text_index, dtype=np.int64),
        )


def _offsets(lengths: list[np.ndarray]) -> np.ndarray:
    """Where each row starts in the flat ids (and, last, where the ids end)."""
    counts = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _rows(flat: np.ndarray, offsets: np.ndarray, index: Any, num_texts: int, sliding: bool) -> TextRows:
    """TextRows over flat ids; ``index`` (sliding windows: each row's text) as blocks or one array."""
    if not sliding:
        text_index = np.arange(num_texts, dtype=np.int64)
    elif isinstance(index, list):
        text_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    else:
        text_index = index
    return TextRows(TokenRows(flat, offsets), text_index, num_texts)


def _build(entry: Path, windowing: Windowing, tokenizer: Any, texts: Sequence[str]) -> TextRows:
    """Tokenise a block at a time, appending the ids to a file, then rename the folder into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    dtype = token_dtype(tokenizer)
    try:
        lengths, index = [], []
        with (staging / "ids.bin").open("wb") as out:
            for flat, counts, text_index in _array_chunks(windowing, tokenizer, texts):
                out.write(flat.tobytes())
                lengths.append(counts)
                index.append(text_index)
        offsets = _offsets(lengths)
        np.save(staging / "offsets.npy", offsets)
        if windowing.sliding:
            np.save(staging / "text_index.npy", _rows(flat, offsets, index, len(texts), True).text_index)
        write_json(staging / "meta.json", {
            "format": FORMAT, "texts": len(texts), "rows": len(offsets) - 1, "tokens": int(offsets[-1]),
            "dtype": dtype.name, "windowing": windowing.describe(), "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })  # fmt: skip
        try:
            os.replace(staging, entry)
        except OSError:  # the entry exists: another process finished it first (keep its copy) or it is damaged
            if _open(entry, len(texts)) is None:
                shutil.rmtree(entry, ignore_errors=True)
                os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rows = _open(entry, len(texts))
    assert rows is not None, entry
    return rows


def _open(entry: Path, num_texts: int) -> TextRows | None:
    """The entry's rows, memory-mapped; None when there is no complete, consistent entry."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("texts") != num_texts:
            return None
        offsets = np.load(entry / "offsets.npy", mmap_mode="r")
        dtype = np.dtype(meta["dtype"])
        size = (entry / "ids.bin").stat().st_size
        if len(offsets) != meta["rows"] + 1 or size != int(offsets[-1]) * dtype.itemsize:
            return None
        flat = np.memmap(entry / "ids.bin", dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        sliding = (entry / "text_index.npy").exists()
        text_index = np.load(entry / "text_index.npy", mmap_mode="r") if sliding else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return _rows(flat, offsets, text_index, num_texts, sliding)
