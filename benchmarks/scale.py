"""Bulk prediction at growing sizes: wall time, texts/s and peak memory of `adaptext predict --input`.

Inputs are AG News test texts (7,600) repeated to N rows with a row id (``id``), written as Parquet a
slice at a time. Each size runs `adaptext predict --input in-N.parquet --output out-N.parquet
--keep-columns id` in its own process; its peak RSS is the child's own ``ru_maxrss`` (os.wait4), its time
the one it reports less its model loading (reading, scoring, writing; start-up and loading are a fixed cost
that would flatter the large sizes). The baseline, measured in the same run on the smallest size, is the
in-memory path: reading the texts, then ``adaptext.load(dir).predict(texts)`` on the whole list, in its own
process, timed the same way (after loading). The table gives per size the time, texts/s,
peak RSS, RSS relative to the smallest size, and texts/s relative to the in-memory baseline.

    python benchmarks/scale.py --model DIR --sizes 10000,100000,1000000
    python benchmarks/scale.py --tiny --sizes 10000,100000,1000000   # a tiny random BERT: the pipeline's own cost
    python benchmarks/scale.py --quick                                # CI-sized: tiny model, 2,000 and 8,000 rows

Without --model or --tiny it first trains a MiniLM head on 400 AG News examples (about a minute).

Training preparation (``--parts train``; both parts by default): AG News training rows (text, label)
repeated to N rows; each size runs ``adaptext train --data train-N.parquet --max-steps 1 --eval-size 200``
twice in its own process with an empty token cache: the first tokenises (and fills the cache), the
second must read the cache instead. Per run: wall time, the tokenisation seconds the run reports, peak
RSS (the child's own, with the model: MiniLM, or the tiny BERT with --tiny), and RSS relative to the
smallest size. One optimiser step, so the time is the preparation (reading, checking, sampling,
tokenising, the head's probe on 4,096 examples) and not training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_speed import default_data_dir  # noqa: E402

IN_MEMORY = """
import sys, time, pyarrow.parquet as pq, adaptext
clf = adaptext.load(sys.argv[1])
started = time.perf_counter()
texts = pq.read_table(sys.argv[2], columns=["text"]).column("text").to_pylist()
clf.predict(texts)
print(time.perf_counter() - started)
"""


def make_input(path: Path, texts: list[str], rows: int) -> None:
    """``rows`` rows of (id, text), the texts repeated in order; written a slice at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, done = None, 0
    while done < rows:
        size = min(len(texts), rows - done)
        table = pa.table({"id": pa.array(range(done, done + size), pa.int64()), "text": texts[:size]})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        done += size
    writer.close()


def make_train_input(path: Path, table, rows: int) -> None:
    """``rows`` labelled rows: the table's (text, label) rows repeated in order, written a slice at a time."""
    import pyarrow.parquet as pq

    writer, done = None, 0
    while done < rows:
        part = table.slice(0, min(table.num_rows, rows - done))
        writer = writer or pq.ParquetWriter(path, part.schema)
        writer.write_table(part)
        done += part.num_rows
    writer.close()


def train_prep(scratch: Path, data_dir: Path, sizes: list[int], tiny: bool) -> list[dict]:
    """Each size trained twice (one step): cold (tokenise, fill the cache), then warm (read the cache)."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(data_dir / "ag_news" / "train.parquet", columns=["text", "label"])
    table = table.take(np.random.RandomState(0).permutation(table.num_rows))  # the file is sorted by label
    extra = ["--max-length", "64", "--model", str(scratch / "tiny-bert")] if tiny else []
    os.environ["ADAPTEXT_TOKEN_CACHE"] = str(scratch / "tokens")  # a cache of this run only, empty at first
    rows = []
    for size in sizes:
        source = scratch / f"train-{size}.parquet"
        make_train_input(source, table, size)
        row: dict = {"rows": size}
        for run in ("cold", "warm"):
            cmd = [sys.executable, "-m", "adaptext", "train", "--data", str(source), "--max-steps", "1",
                   "--eval-size", "200", "--output", str(scratch / f"run-{size}-{run}"), "--quiet", *extra]  # fmt: skip
            if size * 0.9 < 10_000:  # its training split (less validation) is under token_store.CACHE_MIN_TEXTS
                cmd += ["--token-cache", "on"]
            wall, rss, out = run_child(cmd)
            line = next((x for x in out.splitlines() if x.startswith("tokens: ") and " train texts " in x), "")
            cached = "tokenisation skipped" in line
            if cached != (run == "warm"):
                raise SystemExit(f"{run} run on {size:,} rows: unexpected token cache line {line!r}")
            took = re.search(r"tokenised in ([0-9.]+) s", line)
            row[run] = {"seconds": wall, "peak_rss_mb": rss, "tokenise_s": float(took.group(1)) if took else 0.0}
            print(f"train prep {size:>9,} rows, {run}: {wall:6.1f} s (tokenising {row[run]['tokenise_s']:.1f} s) "
                  f"peak RSS {rss:6.0f} MB", flush=True)  # fmt: skip
        rows.append(row)
        source.unlink()
    return rows


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, the child's own peak RSS in MB (reaped with wait4), its stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out


def seconds_in(summary: str) -> float:
    """The seconds `adaptext predict` reports, less its model loading: reading, scoring and writing."""
    match = re.search(r" in ([0-9.]+) s \(model loaded in ([0-9.]+) s\)", summary)
    if not match:
        raise SystemExit(f"no timing in adaptext predict's output: {summary!r}")
    return float(match.group(1)) - float(match.group(2))


def default_model(scratch: Path, data_dir: Path, tiny: bool) -> Path:
    out = scratch / "model"
    if tiny:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny_models import make_tiny_model

        base = make_tiny_model("bert", scratch / "tiny-bert")
        extra = ["--model", str(base), "--max-length", "64"]
    else:
        extra = []
    cmd = [sys.executable, "-m", "adaptext", "train", "--data", str(data_dir / "ag_news"), "--train-size", "400",
           "--test-size", "100", "--method", "head", "--epochs", "1", "--quiet", "--output", str(out), *extra]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a trained adaptext model directory")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT (the pipeline's cost, not a model's)")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated row counts; the first is the baseline")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--quick", action="store_true", help="tiny model, 2,000 and 8,000 rows")
    parser.add_argument("--parts", default="predict,train", help="predict, train or both (comma-separated)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = [2000, 8000] if args.quick else [int(s) for s in args.sizes.split(",")]
    parts = set(args.parts.split(","))
    if not parts or parts - {"predict", "train"}:
        raise SystemExit(f"--parts {args.parts!r}: give predict, train or predict,train")
    import pyarrow.parquet as pq

    texts = pq.read_table(args.data_dir / "ag_news" / "test.parquet", columns=["text"]).column("text").to_pylist()
    with tempfile.TemporaryDirectory(prefix="adaptext-scale-") as tmp:
        scratch = Path(tmp)
        result: dict = {}
        if "train" in parts:
            if args.tiny or args.quick:
                sys.path.insert(0, str(HERE.parent / "tests"))
                from tiny_models import make_tiny_model

                make_tiny_model("bert", scratch / "tiny-bert")
            result["train_prep"] = train_prep(scratch, args.data_dir, sizes, args.tiny or args.quick)
            result["train_model"] = "tiny random BERT" if args.tiny or args.quick else "MiniLM"
        if "predict" in parts:
            result.update(predict_sizes(args, scratch, texts, sizes))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def predict_sizes(args: argparse.Namespace, scratch: Path, texts: list[str], sizes: list[int]) -> dict:
    import pyarrow.parquet as pq

    model = args.model or default_model(scratch, args.data_dir, args.tiny or args.quick)
    rows = []
    for size in sizes:
        source, target = scratch / f"in-{size}.parquet", scratch / f"out-{size}.parquet"
        make_input(source, texts, size)
        cmd = [sys.executable, "-m", "adaptext", "predict", "--model", str(model), "--input", str(source),
               "--output", str(target), "--keep-columns", "id", "--quiet"]  # fmt: skip
        wall, rss, out = run_child(cmd)
        wall = seconds_in(out)
        assert pq.ParquetFile(target).metadata.num_rows == size
        rows.append({"rows": size, "seconds": wall, "texts_per_s": size / wall, "peak_rss_mb": rss})
        print(
            f"streamed {size:>9,} rows: {wall:7.1f} s  {size / wall:8.0f} texts/s  peak RSS {rss:7.0f} MB",
            flush=True,
        )
        target.unlink()
        if size == sizes[0]:
            wall, rss, out = run_child([sys.executable, "-c", IN_MEMORY, str(model), str(source)])
            wall = float(out.split()[-1])
            baseline = {"rows": size, "seconds": wall, "texts_per_s": size / wall, "peak_rss_mb": rss}
            print(
                f"in-memory {size:>8,} rows: {wall:7.1f} s  {size / wall:8.0f} texts/s  peak RSS {rss:7.0f} MB",
                flush=True,
            )
            procs = os.cpu_count() or 1
            wall, rss, out = run_child(cmd + ["--workers", str(procs)])
            wall = seconds_in(out)
            workers = {"rows": size, "workers": procs, "seconds": wall, "texts_per_s": size / wall,
                       "peak_rss_mb": rss}  # fmt: skip
            target.unlink()
            print(f"--workers {procs}, {size:,} rows: {wall:.1f} s, {size / wall:.0f} texts/s", flush=True)
        source.unlink()
    return {"model": str(args.model or ("tiny random BERT" if args.tiny or args.quick else "MiniLM head")),
        "baseline": baseline, "workers": workers, "streamed": rows}  # fmt: skip


def table(result: dict) -> str:
    lines = train_table(result) if "train_prep" in result else []
    if "streamed" in result:
        lines += predict_table(result)
    return "\n".join(lines)


def train_table(result: dict) -> list[str]:
    first = result["train_prep"][0]["cold"]
    lines = [
        f"training preparation ({result['train_model']}, adaptext train --max-steps 1, empty token cache, then again):",
        "",
        "| rows | cold s | of which tokenising s | cold peak RSS MB | RSS / smallest | warm s (cache read) | warm peak RSS MB "
        "| warm / cold time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["train_prep"]:
        cold, warm = row["cold"], row["warm"]
        lines.append(
            f"| {row['rows']:,} | {cold['seconds']:.1f} | {cold['tokenise_s']:.1f} | {cold['peak_rss_mb']:,.0f} | "
            f"{cold['peak_rss_mb'] / first['peak_rss_mb']:.2f}x | {warm['seconds']:.1f} | {warm['peak_rss_mb']:,.0f} | "
            f"{warm['seconds'] / cold['seconds']:.2f}x |"
        )
    return lines + [""]


def predict_table(result: dict) -> list[str]:
    base, first = result["baseline"], result["streamed"][0]
    lines = [
        f"model: {result['model']}; baseline: the in-memory path (adaptext.load(...).predict(list)) on {base['rows']:,} rows: "
        f"{base['seconds']:.1f} s, {base['texts_per_s']:,.0f} texts/s, peak RSS {base['peak_rss_mb']:,.0f} MB",
        f"--workers {result['workers']['workers']} (one thread each) on {result['workers']['rows']:,} rows: "
        f"{result['workers']['texts_per_s']:,.0f} texts/s, "
        f"{result['workers']['texts_per_s'] / first['texts_per_s']:.2f}x one process with every core",
        "",
        "| rows | wall s | texts/s | peak RSS MB | RSS / smallest | texts/s / in-memory |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["streamed"]:
        lines.append(
            f"| {row['rows']:,} | {row['seconds']:.1f} | {row['texts_per_s']:,.0f} | {row['peak_rss_mb']:,.0f} | "
            f"{row['peak_rss_mb'] / first['peak_rss_mb']:.2f}x | {row['texts_per_s'] / base['texts_per_s']:.2f}x |"
        )
    return lines


if __name__ == "__main__":
    main()
