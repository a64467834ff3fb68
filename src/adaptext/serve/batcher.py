"""Micro-batching: requests that arrive together share forward passes.

Every model call runs on one worker thread (torch already uses every core for one batch, and the
registry is not thread-safe), so the event loop stays free to accept requests meanwhile. While a
batch runs, new requests queue; the next batch takes all of them, up to ``max_batch_texts``, after
waiting at most ``max_wait_ms`` for more once the queue is empty. With ``batching=False`` every
request runs alone (the naive one-request-one-forward server, kept as a measured baseline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptext.serve.registry import Registry


@dataclass
class _Job:
    adapter: str
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(
        self,
        registry: Registry,
        max_batch_texts: int = 64,
        max_wait_ms: float = 5.0,
        batching: bool = True,
        on_batch: Callable[[int, int], None] | None = None,
    ):
        self.registry = registry
        self.max_batch_texts = max_batch_texts
        self.max_wait = max_wait_ms / 1000
        self.batching = batching
        self.on_batch = on_batch  # called with (texts, requests) of every forward batch, for /metrics
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptext-model")
        self.queue: asyncio.Queue[_Job] | None = None
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
        """Run ``fn`` on the model thread (loading and unloading adapters go through here too)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ requests

    async def submit(self, adapter: str, texts: list[str]) -> np.ndarray:
        """Probabilities for ``texts`` under ``adapter``, computed in a shared batch."""
        assert self.queue is not None, "Batcher.start() first"
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(adapter, texts, future))
        return await future

    async def _loop(self) -> None:
        assert self.queue is not None
        while True:
            jobs = [await self.queue.get()]
            if self.batching:
                await self._gather(jobs)
            try:
                results = await self.call(self.registry.probabilities, [(j.adapter, j.texts) for j in jobs])
            except Exception as exc:  # noqa: BLE001 — a failed batch fails its requests, not the server
                results = [exc] * len(jobs)
            if self.on_batch is not None:
                self.on_batch(sum(len(j.texts) for j in jobs), len(jobs))
            for job, result in zip(jobs, results):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _gather(self, jobs: list[_Job]) -> None:
        """Add queued requests to ``jobs``: everything already waiting, then what arrives within the wait."""
        assert self.queue is not None
        size = len(jobs[0].texts)
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while size < self.max_batch_texts:
            if self.queue.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    return
            else:
                job = self.queue.get_nowait()
            jobs.append(job)
            size += len(job.texts)
