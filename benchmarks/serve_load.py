"""Load test of `adaptext serve` on loopback: micro-batched server vs the naive one-request-one-forward one.

Both servers hold the same adapters (by default two MiniLM adapters trained here: AG News, 4 labels,
and SST-2, 2 labels, on one shared base) and face the same closed-loop load: ``--clients`` threads,
each with its own keep-alive connection, sending one request after another for ``--duration``
seconds, alternating adapters, one real test text per request. Reported per server: requests/s,
texts/s, p50/p95/p99 latency, errors, forward batches, the server's peak RSS.

    python benchmarks/serve_load.py --json OUT.json            # 60 s x 2 servers, 32 clients
    python benchmarks/serve_load.py --duration 10 --clients 8  # a quick look
    python benchmarks/serve_load.py --adapters A B --record    # your adapters; record for docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def default_data_dir() -> Path:
    return HERE.parent.parent / "shared" / "data"


def train_adapters(work: Path, data_dir: Path, train_size: int, model: str = "minilm") -> list[Path]:
    """Two small MiniLM LoRA adapters on different label sets (reused if ``work`` already has them)."""
    from adaptext import api

    work.mkdir(parents=True, exist_ok=True)

    folders = []
    for name in ("ag_news", "sst2"):
        out = work / name
        if not (out / "adaptext.json").is_file():
            print(f"training the {name} adapter ({train_size} examples, 1 epoch) ...", flush=True)
            api.train(
                data=str(data_dir / name), model=model, train_size=train_size, test_size=200, epochs=1, output=str(out),
                progress=False, echo=lambda line: None,
            )  # fmt: skip
        folders.append(out)
    return folders


def load_texts(data_dir: Path, n: int = 2000) -> list[str]:
    import pandas as pd

    ag = pd.read_parquet(data_dir / "ag_news" / "test.parquet")["text"].tolist()[:n]
    sst = pd.read_parquet(data_dir / "sst2" / "validation.parquet")["text"].tolist()[:n]
    return [t for pair in zip(ag, sst) for t in pair]


class Server:
    """`adaptext serve` in its own process on a free loopback port."""

    def __init__(self, adapters: list[Path], extra: list[str]):
        command = [sys.executable, "-m", "adaptext", "serve", "--port", "0", "--adapters", *map(str, adapters), *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"server failed to start: {self.proc.stderr.read().strip()[-500:]}")
            match = re.search(r"at http://([\d.]+):(\d+)/", line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
        else:
            raise SystemExit("server did not start within 5 minutes")
        while time.time() < deadline:  # the line comes just before uvicorn listens: wait for /readyz
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("server never became ready")

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def metric(self, name: str) -> float:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(server: Server, names: list[str], texts: list[str], clients: int, duration: float, per_request: int) -> dict:
    """Closed-loop clients for ``duration`` seconds; every request's latency and outcome."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    samples: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        i = k
        start.wait()
        while time.perf_counter() < stop_at[0]:
            body = json.dumps(
                {
                    "adapter": names[i % len(names)],
                    "texts": [texts[(i * 7 + j) % len(texts)] for j in range(per_request)],
                }
            )
            sent = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200:
                    errors[k] += 1
                    if len(samples) < 3:
                        samples.append(f"{response.status}: {payload[:200]!r}")
                else:
                    latencies[k].append(time.perf_counter() - sent)
            except (OSError, http.client.HTTPException) as exc:
                errors[k] += 1
                if len(samples) < 3:
                    samples.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            i += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    batches_before = server.metric("adaptext_batch_requests_count")
    stop_at[0] = time.perf_counter() + duration
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    lat = np.array([x for per in latencies for x in per]) * 1000
    ok = len(lat)
    batches = server.metric("adaptext_batch_requests_count") - batches_before
    return {
        "requests": ok + sum(errors),
        "errors": sum(errors),
        "error_samples": samples,
        "seconds": elapsed,
        "requests_per_s": ok / elapsed,
        "texts_per_s": ok * per_request / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p95_ms": float(np.percentile(lat, 95)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
        "forward_batches": batches,
        "requests_per_batch": ok / batches if batches else None,
        "peak_rss_mb": server.peak_rss_mb(),
    }


def warm(server: Server, names: list[str], texts: list[str]) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    for i in range(8):
        body = json.dumps({"adapter": names[i % len(names)], "texts": texts[i : i + 4]})
        conn.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit(f"warm-up request failed: {response.status} {response.read()[:300]!r}")
        response.read()
    conn.close()


def table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Load test: {s['clients']} concurrent clients for {s['duration']:.0f} s per server, "
        f"{s['texts_per_request']} text(s) per request, adapters {', '.join(s['adapters'])} on loopback "
        f"({os.cpu_count()} cores shared by the server and the clients).",
        "",
        "| server | requests/s | texts/s | p50 ms | p95 ms | p99 ms | errors | requests per forward | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("batched", "adaptext serve (micro-batched)"), ("naive", "naive: one request, one forward")):
        r = result[key]
        per = f"{r['requests_per_batch']:.1f}" if r["requests_per_batch"] else "—"
        lines.append(
            f"| {label} | {r['requests_per_s']:.1f} | {r['texts_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['errors']} | {per} | {r['peak_rss_mb']:,.0f} |"
        )
    lines += ["", f"- micro-batched / naive throughput: **{result['speedup']:.2f}x**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", type=Path, help="adapter directories (default: train two here)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default ../shared/data")
    parser.add_argument("--work", type=Path, help="where the default adapters are trained/reused (default: temp)")
    parser.add_argument("--train-size", type=int, default=500, help="examples per default adapter (500)")
    parser.add_argument("--model", default="minilm", help="base model of the default adapters (minilm)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per server (60)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument(
        "--server-args", default="", help="extra adaptext serve options for both servers, e.g. '--threads 1'"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--record", action="store_true", help="also write benchmarks/results/serve-load.{md,json}")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or args.texts_per_request < 1:
        parser.error("--duration, --clients and --texts-per-request must be positive")
    data_dir = args.data_dir or default_data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = args.adapters or train_adapters(args.work or Path(tmp), data_dir, args.train_size, args.model)
        names = [a.resolve().name for a in adapters]
        texts = load_texts(data_dir)
        result: dict = {
            "settings": {
                "clients": args.clients,
                "duration": args.duration,
                "texts_per_request": args.texts_per_request,
                "adapters": names,
                "server_args": args.server_args,
            }
        }
        for key, extra in (("batched", []), ("naive", ["--no-batching"])):
            server = Server(adapters, [*args.server_args.split(), *extra])
            try:
                warm(server, names, texts)
                print(f"{key}: {args.clients} clients for {args.duration:.0f} s ...", flush=True)
                result[key] = load(server, names, texts, args.clients, args.duration, args.texts_per_request)
            finally:
                server.stop()
    batched, naive = result["batched"], result["naive"]
    result["speedup"] = batched["requests_per_s"] / naive["requests_per_s"] if naive["requests_per_s"] else None
    result.update(
        {
            "requests_per_s": batched["requests_per_s"],
            "p50_ms": batched["p50_ms"],
            "p95_ms": batched["p95_ms"],
            "p99_ms": batched["p99_ms"],
            "errors": batched["errors"] + naive["errors"],
            "baseline_requests_per_s": naive["requests_per_s"],
            "baseline_p99_ms": naive["p99_ms"],
        }
    )
    text = table(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        command = " ".join(["python benchmarks/serve_load.py", *(sys.argv[1:] if argv is None else argv)])
        (RESULTS / "serve-load.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "serve-load.md").write_text(f"Recorded {time.strftime('%Y-%m-%d')} with `{command}`.\n\n{text}")
    return result


if __name__ == "__main__":
    main()
