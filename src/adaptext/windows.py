"""Texts to model rows and back: one row per text (truncate, head+tail) or one per sliding window.

With ``--long-text sliding`` a text longer than ``--max-length`` is cut into overlapping windows of
``max_length`` tokens, each with the model's own special tokens (``[CLS] ... [SEP]``, ``<s> ...``,
nothing for GPT-2), so every window looks to the model like a text of its own. Every window trains
as an example carrying its text's label; wherever a text is scored (validation, test metrics,
``adaptext evaluate``/``predict``, the ONNX backend, ``adaptext serve``) its windows' logits are
pooled (mean or max) into one row of logits before softmax and metrics.

Every one of those paths builds its :class:`Windowing` from the same config (``adaptext.json``), so
a reloaded model cuts and pools texts exactly as at training time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptext.batching import TOKENIZE_CHUNK, special_token_split, tokenize
from adaptext.config import TrainConfig, resolve_stride
from adaptext.errors import AdaptextError


@dataclass(frozen=True)
class TextRows:
    """Token ids of the model's rows, and the text each row came from (rows of a text are adjacent)."""

    ids: Sequence[list[int]]  # a list, or for training a token_store.TokenRows (flat arrays)
    text_index: Sequence[int]
    num_texts: int

    def per_row(self, values: list[Any]) -> list[Any]:
        """A per-text list (labels) repeated for every row of its text."""
        return [values[i] for i in self.text_index]


@dataclass(frozen=True)
class Windowing:
    """How texts become rows (``long_text``, ``max_length``, the window options) and how rows pool back."""

    max_length: int
    long_text: str = "truncate"
    stride: int = 0  # tokens shared by consecutive windows
    window_pool: str = "mean"
    max_windows: int = 0  # 0: every window

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Windowing:
        """From a run's config, or a saved model's (``options.saved_config``: older models migrated)."""
        return cls(
            cfg.max_length, cfg.long_text, resolve_stride(cfg.max_length, cfg.stride), cfg.window_pool, cfg.max_windows
        )

    @property
    def sliding(self) -> bool:
        return self.long_text == "sliding"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_length": self.max_length, "long_text": self.long_text}
        if self.sliding:
            out.update(stride=self.stride, window_pool=self.window_pool, max_windows=self.max_windows)
        return out

    def encode(self, tokenizer: Any, texts: list[str]) -> TextRows:
        """The model rows of ``texts``: one each, or with sliding windows one per window."""
        ids: list[list[int]] = []
        text_index: list[int] = []
        for chunk_ids, chunk_index in self.chunks(tokenizer, texts):
            ids += chunk_ids
            text_index += chunk_index
        return TextRows(ids, text_index, len(texts))

    def chunks(self, tokenizer: Any, texts: Sequence[str]) -> Iterator[tuple[list[list[int]], list[int]]]:
        """The rows of ``texts`` a block of texts at a time (the full encodings are heavy): each block's
        token ids and the index of the text each row came from."""
        before, after = self.check(tokenizer)
        budget = self.max_length - before - after  # text tokens per window
        # Decoder tokenizers add no special tokens, so "" becomes no tokens at all: give the model one.
        filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = texts[start : start + TOKENIZE_CHUNK]
            chunk = chunk if isinstance(chunk, list) else list(chunk)
            if not self.sliding:
                yield (
                    tokenize(tokenizer, chunk, self.max_length, self.long_text),
                    list(range(start, start + len(chunk))),
                )
                continue
            ids: list[list[int]] = []
            text_index: list[int] = []
            # verbose=False: the whole text is wanted here, no warning about its length.
            encoded = tokenizer(chunk, truncation=False, padding=False, verbose=False)["input_ids"]
            for offset, seq in enumerate(encoded):
                for window in split_windows(seq or [filler], before, after, budget, self.stride, self.max_windows):
                    ids.append(window)
                    text_index.append(start + offset)
            yield ids, text_index

    def check(self, tokenizer: Any) -> tuple[int, int]:
        """Sliding windows: refuse a --max-length or --stride that leaves a window no new text. Returns the
        special tokens a window has before and after its text (0, 0 without windows)."""
        if not self.sliding:
            return 0, 0
        before, after = special_token_split(tokenizer)
        budget = self.max_length - before - after
        if budget < 1:
            raise AdaptextError(
                f"--max-length {self.max_length} leaves no room for text besides this tokenizer's "
                f"{before + after} special tokens; raise --max-length"
            )
        if self.stride >= budget:
            raise AdaptextError(
                f"--stride {self.stride} leaves no new tokens per window: a window of --max-length {self.max_length} "
                f"holds {budget} text tokens besides this tokenizer's {before + after} special tokens; "
                f"pass a --stride below {budget}"
            )
        return before, after

    def pool_logits(self, row_logits: np.ndarray, rows: TextRows) -> np.ndarray:
        """One row of logits per text: its windows' logits pooled (without windows, rows are texts)."""
        if not self.sliding:
            return row_logits
        return pool_windows(row_logits, rows.text_index, rows.num_texts, self.window_pool)


def split_windows(
    seq: list[int], before: int, after: int, budget: int, stride: int, max_windows: int = 0
) -> list[list[int]]:
    """Overlapping windows of one tokenised text, each ``before`` specials + ``budget`` text tokens + ``after``.

    Consecutive windows share ``stride`` text tokens; the last window ends at the text's end (so it
    may share more with the one before) rather than being a short remainder that would count fully
    in a mean. A text that fits is one window, itself, exactly what truncation gives. ``max_windows``
    keeps that many, spread evenly with the first and last among them (1: the first, i.e. truncate).
    """
    if len(seq) <= before + budget + after:
        return [seq]
    head, body, tail = seq[:before], seq[before : len(seq) - after], seq[len(seq) - after :]
    starts = [*range(0, len(body) - budget, budget - stride), len(body) - budget]
    if max_windows and len(starts) > max_windows:
        last = len(starts) - 1
        picks = [0] if max_windows == 1 else [round(k * last / (max_windows - 1)) for k in range(max_windows)]
        starts = [starts[k] for k in picks]
    return [head + body[s : s + budget] + tail for s in starts]


def pool_windows(row_logits: np.ndarray, text_index: list[int], num_texts: int, how: str) -> np.ndarray:
    """Per text, the mean or the (per-class) max of its rows' logits."""
    index = np.asarray(text_index, dtype=np.int64)
    if how == "max":
        pooled = np.full((num_texts, row_logits.shape[1]), -np.inf, dtype=np.float64)
        np.maximum.at(pooled, index, row_logits)
    else:
        pooled = np.zeros((num_texts, row_logits.shape[1]), dtype=np.float64)
        np.add.at(pooled, index, row_logits)
        pooled /= np.bincount(index, minlength=num_texts)[:, None]
    return pooled.astype(np.float32)
