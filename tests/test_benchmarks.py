"""The benchmark harness: the FLOP formula, and a smoke run of benchmarks/run.py on tiny slices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from adaptext.precision import cpu_has_fast_bf16, resolve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from flops import Shape, best_peaks, forward_flops, matmul_peaks, mfu, run_flops, train_flops  # noqa: E402
from train_speed import seed_list, seed_spread, seed_table  # noqa: E402


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


def test_mfu_divides_by_the_peak_of_the_precision_the_run_used():
    peaks = {"fp32": 100e9, "bf16": 700e9}
    assert mfu(50e9, 1.0, "fp32", peaks) == pytest.approx(0.5)
    assert mfu(350e9, 1.0, "bf16", peaks) == pytest.approx(0.5)  # not 3.5: bf16 runs against the bf16 peak
    assert mfu(1e9, 1.0, "int8", peaks) is None  # no int8 peak is measured
    with pytest.raises(KeyError, match="no fp16 matmul peak"):
        mfu(1e9, 1.0, "fp16", peaks)


def test_matmul_peaks_measures_fp32_and_bf16_in_one_call():
    peaks = matmul_peaks("cpu", seconds=0.05, n=256)  # small: bf16 is emulated (slow) on AVX2-only CPUs
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())
    # A busy machine only slows a measurement down: of several, the best per precision counts.
    assert best_peaks({"fp32": 3, "bf16": 9}, {"fp32": 5, "bf16": 7}) == {"fp32": 5, "bf16": 9}


def test_seed_spread_pairs_each_seed_and_reports_mean_and_sd():
    def pair(seed, expert_acc, ours_acc, expert_s, ours_s):
        return {
            "seed": seed,
            "expert": {"test_accuracy": expert_acc, "wall_s": expert_s},
            "adaptext": {"test_accuracy": ours_acc, "wall_s": ours_s},
        }

    spread = seed_spread([pair(42, 0.86, 0.85, 100, 80), pair(1, 0.80, 0.83, 120, 90), pair(2, 0.84, 0.84, 110, 88)])
    assert spread["seeds"] == [42, 1, 2]
    assert [round(r["accuracy_delta_pt"], 6) for r in spread["rows"]] == [-1.0, 3.0, 0.0]
    assert spread["accuracy_delta_pt_mean"] == pytest.approx(2 / 3)
    assert spread["accuracy_delta_pt_sd"] == pytest.approx(((5 / 3) ** 2 + (7 / 3) ** 2 + (2 / 3) ** 2) ** 0.5 / 2**0.5)
    assert spread["time_ratio_range"] == [pytest.approx(0.75), pytest.approx(0.8)]
    assert spread["adaptext_accuracy_mean"] == pytest.approx(0.84)
    text = seed_table(spread)
    assert "| 1 | 0.8000 | 0.8300 | +3.00 | 120 | 90 | 0.75 |" in text
    assert "over 3 seeds: accuracy +0.67 ± 2.08 points" in text and "wall ratio 0.78 (0.75–0.80)" in text


def test_seed_list_reads_distinct_integers_and_names_the_fix():
    assert seed_list("42,1,2") == (42, 1, 2)
    for bad, why in (("42,x", "comma-separated list of integers"), ("1,1", "repeats a seed")):
        with pytest.raises(Exception, match=why):
            seed_list(bad)


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
    precisions = {**result["train"]["precision"], **result["head"]["precision"], **result["infer"]["precision"]}
    assert {"notebook", "expert", "adaptext", "expert-head", "adaptext-head"} <= set(mfus) == set(precisions)
    # Both peaks come from the same run, and each MFU is against the peak of its own row's precision, so it
    # stays below 1 whether a pipeline ran fp32 or bf16 (AMX CPUs run bf16 ~7x faster than fp32).
    peaks = result["peaks"]
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values()), peaks
    assert result["raw"]["train"]["peaks"] == result["raw"]["infer"]["peaks"] == peaks
    assert result["raw"]["train"]["peak_flops"] == peaks["fp32"]  # kept for older readers
    assert precisions["notebook"] == "fp32" and precisions["adaptext"] == resolve("auto", torch.device("cpu"))
    assert precisions["expert"] == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert all(precisions[k] in peaks for k in precisions if "int8" not in k), precisions
    assert all(0 < v < 1.5 for k, v in mfus.items() if "int8" not in k), (mfus, precisions, peaks)
    # int8 paths have no MFU (their matmuls run against a peak not measured): None, said in the table.
    assert all(v is None and precisions[k] == "int8" for k, v in mfus.items() if "int8" in k), mfus
    runs = result["raw"]["train"]["cases"][0]["runs"]
    for run in runs.values():
        assert run["mfu"] == pytest.approx(run["flops"] / run["train_s"] / peaks[run["precision"]])
    assert runs["notebook"]["padding_fraction"] > 0.5 > runs["adaptext"]["padding_fraction"]
    text = doc.read_text()
    assert "## Training: agnews" in text and "## Inference" in text and "adaptext / expert wall time" in text
    assert f"Matmul peaks measured in the same run (best of its start and end): fp32 {peaks['fp32'] / 1e9:,.0f}" in text
    measured = result["raw"]["train"]["peak_measurements"]
    assert peaks == {k: max(measured["start"][k], measured["end"][k]) for k in peaks}
    assert "| pipeline | method | precision |" in text and "| path | precision |" in text
    assert f"| adaptext | lora | {precisions['adaptext']} |" in text


def test_fewshot_table_puts_the_arms_side_by_side_with_the_published_figure():
    import fewshot

    def row(dataset, method, mean, seeds, chance=False):
        return {"dataset": dataset, "method": method, "train_size": "8/class", "status": "ok",
                "accuracy_mean": mean, "accuracy_std": 0.01, "accuracy_per_seed": seeds, "train_seconds_mean": 30.0,
                "at_or_below_chance": chance}  # fmt: skip

    study = {
        "rows": [row("ag_news", "lora", 0.85, [0.84, 0.86]), row("ag_news", "setfit", 0.82, [0.81, 0.83]),
                 row("emotion", "lora", 0.30, [0.30, 0.30], chance=True),
                 {"dataset": "emotion", "method": "setfit", "train_size": "8/class", "status": "failed"}],
        "sizes": ["8/class"], "methods": ["lora", "setfit"], "model": "minilm",
    }  # fmt: skip
    lines = fewshot.table(study).splitlines()
    assert lines[0].startswith("| data | size | lora accuracy | setfit accuracy |")
    assert lines[2] == (
        "| ag_news | 8/class | **0.850** ± 0.010 (0.840, 0.860) | **0.820** ± 0.010 (0.810, 0.830) | 30 | 30 | 0.831 | +3.0 |"
    )
    assert "⚠ chance" in lines[3] and "| failed |" in lines[3] and lines[3].endswith("| 0.391 | – |")


@pytest.mark.processes
def test_scale_quick_streams_and_reports_memory_and_throughput(tmp_path):
    """benchmarks/scale.py --quick: a tiny model over 2,000 and 8,000 AG News rows, the in-memory baseline and
    --workers in the same run; every figure is there and the output files held every row (checked inside);
    and training preparation at the same sizes, twice each."""
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["rows"] for row in result["streamed"]] == [2000, 8000]
    for row in [*result["streamed"], result["baseline"], result["workers"]]:
        assert row["texts_per_s"] > 0 and row["seconds"] > 0
    assert all(row["peak_rss_mb"] > 100 for row in result["streamed"])
    assert "| 8,000 |" in done.stdout and "texts/s / in-memory" in done.stdout
    # Training preparation: each size cold (tokenised into the cache) then warm (read from it; the script
    # fails if the warm run tokenised again).
    assert [row["rows"] for row in result["train_prep"]] == [2000, 8000]
    for row in result["train_prep"]:
        assert row["cold"]["tokenise_s"] > 0 and row["warm"]["tokenise_s"] == 0
        assert row["cold"]["peak_rss_mb"] > 100 and row["warm"]["seconds"] > 0
    assert "warm s (cache read)" in done.stdout
