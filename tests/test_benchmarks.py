"""The benchmark harness: the FLOP formula, and a smoke run of benchmarks/run.py on tiny slices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from flops import Shape, forward_flops, run_flops, train_flops  # noqa: E402


def test_flop_formula_counts_matmuls_and_attention():
    shape = Shape.of(BertConfig(num_hidden_layers=6, hidden_size=384, intermediate_size=1536))
    assert shape == Shape(6, 384, 1536)
    per_token_weights = 4 * 384 * 384 + 2 * 384 * 1536
    one = 2 * per_token_weights * 10 + 4 * 384 * 10 * 10
    assert forward_flops(shape, [10]) == 6 * one
    assert train_flops(shape, [10], weights_trained=True) == 3 * 6 * one  # full fine-tuning
    assert train_flops(shape, [10]) == 2 * 6 * one  # frozen weights still pass gradients down
    assert train_flops(shape, [10], trained_from=4) == (4 + 2 * 2) * one
    # head-only on a cache of every layer: the layers run once, over the cached examples only
    assert run_flops(shape, [10], 3, "head", cached_layers=6, cache_lens=[10, 10]) == 6 * 2 * one
    assert run_flops(shape, [10], 3, "lora", cached_layers=3, cache_lens=[10]) == 3 * one + 3 * 2 * 3 * one


@pytest.mark.e2e
def test_run_py_smoke_writes_every_acceptance_figure(tmp_path):
    if not (ROOT.parent / "shared" / "data" / "ag_news").is_dir():
        pytest.skip("needs ../shared/data")
    out, doc = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--train-size", "24", "--test-size",
           "24", "--epochs", "1", "--json", str(out), "--docs", str(doc)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("time_ratio_vs_expert", "time_ratio_vs_notebook", "accuracy_delta_vs_expert_pt"):
        assert isinstance(result["train"][key], float)
    assert result["head"]["speedup_vs_expert"] > 0
    assert result["infer"]["speedup_vs_peft"] > 0 and "accuracy_delta_pt" in result["infer"]
    mfus = {**result["train"]["mfu"], **result["head"]["mfu"], **result["infer"]["mfu"]}
    assert {"notebook", "expert", "adaptext", "expert-head", "adaptext-head"} <= set(mfus)
    # int8 paths have no fp32 MFU (their matmuls run against another peak): None, said in the table.
    assert all(0 < v < 1.5 for k, v in mfus.items() if "int8" not in k), mfus
    assert all(v is None for k, v in mfus.items() if "int8" in k), mfus
    runs = result["raw"]["train"]["cases"][0]["runs"]
    assert runs["notebook"]["padding_fraction"] > 0.5 > runs["adaptext"]["padding_fraction"]
    text = doc.read_text()
    assert "## Training: agnews" in text and "## Inference" in text and "adaptext / expert wall time" in text
