"""Progress of a bulk prediction on stderr: texts done, texts/s and the time left."""

from __future__ import annotations

import sys
import time

from adaptext.bulk_input import Source


class Progress:
    """Texts done, texts/s and the time left, on stderr: redrawn each second on a terminal, a line every
    30 s otherwise (logs). The total is known for Parquet; for text files it is estimated from the bytes read."""

    def __init__(self, source: Source, enabled: bool = True):
        self.source, self.enabled = source, enabled
        self.total = source.total_rows()
        self.rows = self.computed = 0
        self.started = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def advance(self, rows: int, computed: bool) -> None:
        self.rows += rows
        self.computed += rows if computed else 0
        now = time.perf_counter()
        if self.enabled and now - self.last >= (1.0 if self.tty else 30.0):
            self.last = now
            print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.computed / elapsed
        if self.total:
            left, share = self.total - self.rows, self.rows / self.total
        else:
            share = self.source.bytes_done / max(self.source.total_bytes, 1)
            left = int(self.rows / share - self.rows) if share > 0 else 0
        eta = _duration(left / rate) if rate > 0 and left > 0 else "-"
        of = f"/{self.total:,}" if self.total else ""
        return f"predict: {self.rows:,}{of} texts ({share:.0%}), {rate:,.0f} texts/s, {eta} left   "

    def done(self) -> None:
        if self.enabled and self.tty and self.rows:
            print("\r" + self.line(), file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
