"""One adaptext training run for the benchmark harness, in its own process (so peak RSS is its own).

    python benchmarks/adaptext_run.py --data DIR --train-size N --json OUT.json [any `adaptext train` option]

Runs ``adaptext.api.train`` (the function behind ``adaptext train``) with the defaults unless options
are given, and writes the fields train_speed.py compares against hf_baseline.py.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

started = time.perf_counter()

from adaptext import api, artifacts, cli  # noqa: E402


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--json") + 1])
    options = argv[: argv.index("--json")] + argv[argv.index("--json") + 2 :]
    parser = cli.build_parser()
    args = parser.parse_args(["train", *options])
    values, _ = cli.gather_options(args)
    # The harness compares pipelines at equal epochs: --epochs must mean epochs, not be raised to adaptext's
    # small-data floor of optimiser steps (--min-steps; the few-label study, benchmarks/fewshot.py, keeps it).
    values.setdefault("min_steps", 0)
    with tempfile.TemporaryDirectory() as tmp:
        values.update(output=str(Path(tmp) / "run"), overwrite=True)
        keep = os.environ.get("ADAPTEXT_BENCH_KEEP")  # infer_speed.py reuses the trained model
        if keep:
            values["output"] = keep
        run_started = time.perf_counter()
        outcome = api.train(values, progress=False, echo=lambda line: print(line, flush=True))
        run_s = time.perf_counter() - run_started
    train = outcome.metrics["train"]
    test = outcome.metrics.get("test") or outcome.metrics["validation"]
    record = {
        "pipeline": "adaptext",
        "method": outcome.meta["method"],
        "run_s": round(run_s, 2),  # data + model loading, tokenising, training, validation, test, saving
        "process_s": round(time.perf_counter() - started, 2),
        "train_s": train["seconds"],
        "train_wall_s": train["wall_seconds"],
        "train_samples_per_s": train["samples_per_second"],
        "train_real_tokens_per_s": train["tokens_per_second"],
        "padding_fraction": train["padding_fraction"],
        "cached_layers": train["cached_layers"],
        "feature_cache": train["feature_cache"],
        "peak_rss_mb": artifacts.peak_rss_mb(),
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "n_test": test["n"],
        "epochs": outcome.meta["config"]["epochs"],
        "precision": train["precision"],
        "trainable_params": outcome.meta["params"]["trainable"],
    }
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(record, indent=2))
    tmp_out.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
