"""Bulk prediction: any number of texts in constant memory, with progress, resumable after a kill.

``adaptext predict --input texts.parquet --output labels.parquet`` reads the input a chunk at a time
(adaptext.bulk_input), scores each chunk (length-sorted batches within it) and writes it as a part
file in ``labels.parquet.parts/`` with a manifest of the finished parts; at the end the parts are
joined, in input order, into the output (written to a temporary name, then renamed) and the folder is
removed. After a kill, ``--resume`` keeps every part the manifest lists and scores the rest: the joined
output is the same as an uninterrupted run's, because the chunks are the same. The output file never
exists before the last part is in it.

Each part holds the chunk's logits (float32), not the formatted rows, so the join formats them with the
same code as ``Classifier.predict``. ``--workers N`` scores chunks in N processes (one model each, the
cores shared out); this process reads, writes and keeps the order.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptext import ray_data
from adaptext.artifacts import atomic_path, class_names_of, read_labels, read_meta, write_text
from adaptext.bulk_input import Chunk, Source
from adaptext.errors import AdaptextError
from adaptext.outputs import check_output, prediction_file, result_line
from adaptext.predict import load
from adaptext.progress import Progress
from adaptext.readers import release_memory
from adaptext.tasks import Task

PLAN_VERSION = 1


@dataclass
class Job:
    """One bulk prediction. ``output`` None prints to stdout (``as_json``: one JSON object per text)."""

    model: str
    source: Source
    output: Path | None = None
    top_k: int = 1
    batch_size: int = 64
    precision: str = "auto"
    base: str | None = None
    backend: str = "torch"
    resume: bool = False
    workers: int = 1
    as_json: bool = False
    progress: bool = True
    threads: int | None = None  # per worker; default: the cores shared out
    engine: str = "local"  # or "ray": Ray Data reads and scores (adaptext.ray_data)


@dataclass
class Summary:
    rows: int
    computed: int  # rows scored by this run (the rest came from a resumed run's parts)
    seconds: float
    precision: str
    output: Path | None
    load_seconds: float = 0.0  # of ``seconds``: loading the model (texts/s counts the rest)

    def line(self) -> str:
        busy = self.seconds - self.load_seconds
        rate = self.computed / busy if busy > 0 else 0.0
        resumed = f", {self.rows - self.computed:,} from the finished parts" if self.computed < self.rows else ""
        where = f" to {self.output}" if self.output else ""
        return (f"wrote {self.rows:,} predictions{where} ({self.precision}) in {self.seconds:.1f} s "
                f"(model loaded in {self.load_seconds:.1f} s), {rate:,.0f} texts/s{resumed}")  # fmt: skip


def parts_dir(output: Path) -> Path:
    return output.with_name(f"{output.name}.parts")


def run(job: Job, echo: Callable[[str], None] = print) -> Summary:
    """Score every text of ``job.source``; write the output (or print) and return what was done."""
    if job.workers < 1:
        raise AdaptextError(f"--workers {job.workers}: give 1 or more processes")
    if job.resume and job.output is None:
        raise AdaptextError("--resume continues a run that writes --output FILE; give the same --output")
    if job.output is not None:
        check_output(job.output)
        if parts_dir(job.output).exists() and not job.resume:  # before loading anything
            _open_parts(parts_dir(job.output), {}, False, job.output)
    started = time.perf_counter()
    scorer = _scorer(job)
    loaded = time.perf_counter() - started
    try:
        if job.output is None:
            computed, rows = _to_stdout(job, scorer, echo)
        else:
            computed, rows = _to_file(job, scorer)
    finally:
        scorer.close()
    return Summary(rows, computed, time.perf_counter() - started, scorer.precision, job.output, loaded)


# ---------------------------------------------------------------- scoring in this process or in workers


class _Scorer:
    """Logits for chunks, in the order the chunks were given, from one model in this process."""

    def __init__(self, job: Job):
        if job.threads:
            import torch

            torch.set_num_threads(job.threads)
        self.model = load(job.model, batch_size=job.batch_size, precision=job.precision, base=job.base,
                          backend=job.backend)  # fmt: skip
        self.precision = self.model.precision
        self.class_names = self.model.class_names
        self.task = self.model.task

    def pairs(self, source: Source, finished: dict[int, Any], progress: Progress) -> Iterator[tuple[Chunk, np.ndarray]]:
        """Each chunk of ``source`` not among the ``finished`` parts, with its logits, in input order."""
        return self.scored(_skipping(source.chunks(), finished, progress))

    def scored(self, chunks: Iterator[Chunk]) -> Iterator[tuple[Chunk, np.ndarray]]:
        for chunk in chunks:
            yield chunk, self.model.logits(chunk.texts)

    def close(self) -> None:
        pass


class _Pool(_Scorer):
    """The same, from N worker processes (spawned: each loads the model once); at most 2 chunks per
    worker in flight, so memory stays bounded whatever the input's size."""

    def __init__(self, job: Job):
        context = multiprocessing.get_context("spawn")
        self.tasks: Any = context.Queue()
        self.results: Any = context.Queue()
        threads = job.threads or max(1, (os.cpu_count() or 1) // job.workers)
        settings = {"model": job.model, "batch_size": job.batch_size, "precision": job.precision, "base": job.base,
                    "backend": job.backend, "threads": threads}  # fmt: skip
        self.procs = [
            context.Process(
                target=_work, args=(settings, _device(i, job), self.tasks, self.results, os.getpid()), daemon=True
            )  # fmt: skip
            for i in range(job.workers)
        ]
        for proc in self.procs:
            proc.start()
        ready = [self._get() for _ in self.procs]
        self.precision, self.class_names, self.task = ready[0][1]
        self.limit = 2 * job.workers

    def _get(self) -> Any:
        while True:
            try:
                message = self.results.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in self.procs):
                    raise AdaptextError(
                        "a --workers process died (out of memory?); run again with fewer workers"
                    ) from None
                continue
            if message[0] == "error":
                raise AdaptextError(message[1])
            return message

    def scored(self, chunks: Iterator[Chunk]) -> Iterator[tuple[Chunk, np.ndarray]]:
        waiting: dict[int, Chunk] = {}
        done: dict[int, np.ndarray] = {}
        order: list[int] = []
        for chunk in chunks:
            self.tasks.put((chunk.index, chunk.texts))
            waiting[chunk.index] = chunk
            order.append(chunk.index)
            while len(waiting) - len(done) >= self.limit or (order and order[0] in done):
                if order[0] in done:
                    index = order.pop(0)
                    yield waiting.pop(index), done.pop(index)
                    continue
                _, index, logits = self._get()
                done[index] = logits
        while order:
            if order[0] not in done:
                _, index, logits = self._get()
                done[index] = logits
                continue
            index = order.pop(0)
            yield waiting.pop(index), done.pop(index)

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _device(i: int, job: Job) -> str | None:
    """Worker i's device: the i-th GPU when there are GPUs (torch backend), else the default."""
    if job.backend != "torch":
        return None
    import torch

    return f"cuda:{i % torch.cuda.device_count()}" if torch.cuda.is_available() else None


def _work(settings: dict[str, Any], device: str | None, tasks: Any, results: Any, parent: int) -> None:
    """A worker process: load the model once, then score chunks until told to stop (or the parent is gone)."""
    try:
        import torch

        torch.set_num_threads(settings["threads"])
        model = load(settings["model"], device=device, batch_size=settings["batch_size"],
                     precision=settings["precision"], base=settings["base"], backend=settings["backend"])  # fmt: skip
        results.put(("ready", (model.precision, model.class_names, model.task)))
        while True:
            try:
                item = tasks.get(timeout=5.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
            if item is None:
                return
            index, texts = item
            results.put(("logits", index, model.logits(texts)))
    except AdaptextError as exc:
        results.put(("error", str(exc)))
    except Exception as exc:  # reported by the parent as one line; the traceback would be a worker's
        results.put(("error", f"a --workers process failed: {type(exc).__name__}: {exc}"))


class _RayScorer(_Scorer):
    """Ray Data reads the input and runs ``job.workers`` actors (adaptext.ray_data.Predictor, one model
    each); the batches come back here in input order."""

    def __init__(self, job: Job):
        if job.resume:
            raise AdaptextError("--resume is not available with --engine ray; rerun without it")
        folder = Path(job.model)
        self.task = Task.from_meta(read_meta(folder))
        self.class_names = class_names_of(read_labels(folder))
        self.precision = job.precision  # the actors' resolved precision replaces it with the first batch
        self.job = job
        ray_data.start()

    def pairs(self, source: Source, finished: dict[int, Any], progress: Progress) -> Iterator[tuple[Chunk, np.ndarray]]:
        job = self.job
        threads = job.threads or max(1, (os.cpu_count() or 1) // job.workers)  # each actor reserves its threads
        kwargs = {"model": str(Path(job.model).resolve()), "text_column": source.text_columns, "batch_size": job.batch_size,
                  "precision": job.precision, "backend": job.backend, "base": job.base, "with_logits": True,
                  "keep": source.keep_columns, "threads": threads}  # fmt: skip
        dataset = ray_data.read(source.files).map_batches(
            ray_data.Predictor, fn_constructor_kwargs=kwargs, batch_format="pandas", batch_size=source.chunk_rows,
            concurrency=job.workers, num_cpus=ray_data.actor_cpus(threads, job.workers),
        )  # fmt: skip
        row = 0
        for index, batch in enumerate(dataset.iter_batches(batch_format="pandas", batch_size=None)):
            self.precision = str(batch["precision"].iloc[0]) if len(batch) else self.precision
            kept = {c: batch[c].tolist() for c in source.keep_columns}
            logits = np.stack(batch["logits"].to_numpy()) if len(batch) else np.zeros((0, len(self.class_names)))
            chunk = Chunk(index, row, batch["text"].tolist(), kept)
            row += len(chunk)
            yield chunk, logits


def _scorer(job: Job) -> _Scorer:
    if job.engine == "ray":
        return _RayScorer(job)
    return _Pool(job) if job.workers > 1 else _Scorer(job)


# ---------------------------------------------------------------- outputs


def _to_stdout(job: Job, scorer: _Scorer, echo: Callable[[str], None]) -> tuple[int, int]:
    progress = Progress(job.source, job.progress and not sys.stdout.isatty())  # not between the lines
    for chunk, logits in scorer.pairs(job.source, {}, progress):
        for text, row in zip(chunk.texts, scorer.task.results(logits, scorer.class_names, job.top_k)):
            if job.as_json:
                echo(json.dumps({"text": text, **row, "precision": scorer.precision}, ensure_ascii=False))
            else:
                echo(result_line(row, text))
        progress.advance(len(chunk), computed=True)
    return progress.computed, progress.rows


def _to_file(job: Job, scorer: _Scorer) -> tuple[int, int]:
    assert job.output is not None
    folder = parts_dir(job.output)
    plan = {"version": PLAN_VERSION, "model": str(Path(job.model).resolve()), "base": job.base,
            "backend": job.backend, "precision": job.precision, "engine": job.engine, "class_names": scorer.class_names,
            "input": job.source.fingerprint()}  # fmt: skip
    manifest = _open_parts(folder, plan, job.resume, job.output)
    finished = {part["index"]: part for part in manifest["parts"]}
    progress = Progress(job.source, job.progress)
    try:
        for chunk, logits in scorer.pairs(job.source, finished, progress):
            manifest["parts"].append(_write_part(folder, chunk, logits))
            write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
            progress.advance(len(chunk), computed=True)
            release_memory()  # 300k rows, tiny model: peak 631 MB without, 607 MB with
        progress.done()
        _join(folder, manifest, job, scorer)
    except AdaptextError:
        shutil.rmtree(folder, ignore_errors=True)  # bad input: a fixed input is a new run, the parts are of no use
        raise
    shutil.rmtree(folder, ignore_errors=True)
    return progress.computed, progress.rows


def _open_parts(folder: Path, plan: dict[str, Any], resume: bool, output: Path) -> dict[str, Any]:
    """The manifest to continue (``--resume``) or a new one; parts of another run are refused."""
    path = folder / "manifest.json"
    if folder.exists() and not resume:
        raise AdaptextError(
            f"{folder} holds the parts of an interrupted run; pass --resume to continue it, or remove the folder"
        )
    if folder.exists() and path.is_file():
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("plan") != plan:
            changed = [k for k in plan if manifest.get("plan", {}).get(k) != plan[k]]
            raise AdaptextError(
                f"--resume: the parts in {folder} were made with a different {', '.join(changed)}; "
                "rerun with the same --model and --input (unchanged files), or remove the folder to start again"
            )
        listed = {p["file"] for p in manifest["parts"]}
        for stray in folder.iterdir():  # a part written after the last manifest update: scored again
            if stray.name != "manifest.json" and stray.name not in listed:
                stray.unlink()
        return manifest
    folder.mkdir(exist_ok=True)
    manifest = {"plan": plan, "parts": []}
    write_text(path, json.dumps(manifest, indent=1))
    return manifest


def _skipping(chunks: Iterator[Chunk], finished: dict[int, Any], progress: Progress) -> Iterator[Chunk]:
    for chunk in chunks:
        if chunk.index in finished:
            if finished[chunk.index]["rows"] != len(chunk):
                raise AdaptextError(f"--resume: part {chunk.index} does not match the input; remove the parts folder")
            progress.advance(len(chunk), computed=False)
            continue
        yield chunk


def _write_part(folder: Path, chunk: Chunk, logits: np.ndarray) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {"text": pa.array(chunk.texts, pa.string())}
    for name, values in chunk.kept.items():
        columns[f"kept:{name}"] = _arrow_column(values)
    flat = pa.array(np.ascontiguousarray(logits, dtype=np.float32).reshape(-1))
    columns["logits"] = pa.FixedSizeListArray.from_arrays(flat, logits.shape[1])
    name = f"part-{chunk.index:07d}.parquet"
    with atomic_path(folder / name) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return {"index": chunk.index, "file": name, "rows": len(chunk), "first_row": chunk.first_row}


def _arrow_column(values: list[Any]) -> Any:
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in one chunk: kept as their text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _join(folder: Path, manifest: dict[str, Any], job: Job, scorer: _Scorer) -> None:
    import pyarrow.parquet as pq

    assert job.output is not None
    kept = job.source.keep_columns
    with prediction_file(job.output, scorer.class_names, scorer.precision, kept) as writer:
        for part in sorted(manifest["parts"], key=lambda p: p["index"]):
            table = pq.read_table(folder / part["file"])
            logits = np.asarray(table.column("logits").combine_chunks().flatten(), dtype=np.float32)
            logits = logits.reshape(len(table), -1)
            results = scorer.task.results(logits, scorer.class_names, job.top_k)
            values = {c: table.column(f"kept:{c}").to_pylist() for c in kept}
            writer.write(table.column("text").to_pylist(), results, values)
