"""Micro-batching: requests that arrive together share forward passes.

Every model call runs on one worker thread (torch already uses every core for one batch, and the
registry is not thread-safe), so the event loop stays free to accept requests meanwhile. A request
is tokenised on arrival into model rows (one per text, or one per window of a ``--long-text sliding``
model), and the limit counts those rows, not texts: 64 long documents may be thousands of windows.
While a micro-batch runs, new requests queue; the next one takes queued requests in order while
their rows fit ``max_batch_rows``, after waiting at most ``max_wait_ms`` for more once the queue is
empty. A request with more rows than that is still served, ``max_batch_rows`` rows at a time: after
each piece it goes to the back of the line, so requests behind it wait for one piece, not for all of
it. Its texts are pooled only once all its rows are computed, so the answer equals
``adaptext predict``'s. Inside a micro-batch the registry cuts forward passes of at most
``--batch-size`` rows. With ``batching=False`` every request runs alone (the naive
one-request-one-forward server, kept as a measured baseline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptext.serve.registry import Adapter, Registry
from adaptext.windows import TextRows


@dataclass
class _Job:
    """One request: its model rows, and the logits of those computed so far."""

    adapter: Adapter
    rows: TextRows
    future: asyncio.Future = field(repr=False)
    logits: list[np.ndarray] = field(default_factory=list)  # one array per piece, in row order
    done: int = 0  # rows computed so far

    @property
    def remaining(self) -> int:
        return len(self.rows.ids) - self.done


class Batcher:
    def __init__(
        self,
        registry: Registry,
        max_batch_rows: int = 64,
        max_wait_ms: float = 5.0,
        batching: bool = True,
        on_batch: Callable[[int, int, int], None] | None = None,
    ):
        self.registry = registry
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1000
        self.batching = batching
        self.on_batch = on_batch  # called with (rows, texts, requests) of every micro-batch, for /metrics
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptext-model")
        self.queue: asyncio.Queue[_Job] | None = None
        self.held: _Job | None = None  # taken from the queue but too big for the last micro-batch: starts the next
        self.task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="adaptext-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the model thread (tokenising, loading and unloading adapters go through here too)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ requests

    async def submit(self, adapter: str, texts: list[str]) -> np.ndarray:
        """Probabilities for ``texts`` under ``adapter``, computed in shared micro-batches."""
        assert self.queue is not None, "Batcher.start() first"
        served, rows = await self.call(self.registry.encode, adapter, texts)
        if not rows.ids:
            return np.zeros((0, len(served.class_names)), dtype=np.float32)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(served, rows, future))
        return await future

    async def _loop(self) -> None:
        while True:
            jobs = await self._next_batch()
            # Only the first job can have more rows than the limit (_next_batch adds others only whole).
            pieces = [(job, job.done, job.done + min(job.remaining, self.max_batch_rows)) for job in jobs]
            parts = [(job.adapter, job.rows.ids[start:stop]) for job, start, stop in pieces]
            try:
                results = await self.call(self.registry.row_logits, parts)
            except Exception as exc:  # noqa: BLE001 — a failed batch fails its requests, not the server
                results = [exc] * len(pieces)
            if self.on_batch is not None:
                rows = sum(stop - start for _, start, stop in pieces)
                texts = sum(len(set(job.rows.text_index[start:stop])) for job, start, stop in pieces)
                self.on_batch(rows, texts, len(pieces))
            for (job, _, stop), result in zip(pieces, results):
                self._record(job, stop, result)

    async def _next_batch(self) -> list[_Job]:
        """Requests for the next micro-batch in arrival order: everything already waiting, then what arrives
        within the wait, while their rows fit ``max_batch_rows`` (the first may have more; it runs a piece)."""
        assert self.queue is not None
        if self.held is not None:
            jobs, self.held = [self.held], None
        else:
            jobs = [await self.queue.get()]
        if not self.batching:
            return jobs
        rows = jobs[0].remaining
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while rows < self.max_batch_rows:
            if self.queue.empty():
                wait = deadline - asyncio.get_running_loop().time()
                if wait <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), wait)
                except asyncio.TimeoutError:
                    break
            else:
                job = self.queue.get_nowait()
            if rows + job.remaining > self.max_batch_rows:
                self.held = job
                break
            jobs.append(job)
            rows += job.remaining
        return jobs

    def _record(self, job: _Job, stop: int, result: np.ndarray | BaseException) -> None:
        """Keep a piece's logits; answer once all the job's rows are computed, else requeue it at the back."""
        assert self.queue is not None
        if job.future.done():  # the client went away: its other rows are not computed
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
            return
        job.logits.append(result)
        job.done = stop
        if job.remaining:
            self.queue.put_nowait(job)
            return
        try:  # pooled over every row of each text, whichever pieces they ran in
            job.future.set_result(job.adapter.scores(job.rows, np.concatenate(job.logits)))
        except Exception as exc:  # noqa: BLE001 — fails this request, not the loop
            job.future.set_exception(exc)
