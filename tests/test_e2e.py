"""End to end on the real all-MiniLM-L6-v2 with slices of ../shared/data, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    SHARED_DATA,
    assert_labels_agree,
    assert_logits_close,
    assert_probs_close,
    needs_shared_data,
    run_cli,
)

pytestmark = [pytest.mark.e2e, needs_shared_data()]


@pytest.fixture(scope="module")
def agnews_model(tmp_path_factory):
    output = tmp_path_factory.mktemp("e2e") / "agnews"
    # fmt: off
    result = run_cli("train", "--data", str(SHARED_DATA / "ag_news"), "--train-size", "400", "--eval-size", "80",
                     "--test-size", "200", "--epochs", "2", "--min-steps", "0", "--max-length", "64", "--seed", "1",
                     "--output", str(output), "--quiet")
    # fmt: on
    assert result.returncode == 0, result.stderr
    assert "newly initialised, trained and saved: classifier" in result.stdout
    assert "trainable: 73,728 adapter + 1,540 head" in result.stdout
    return output


def test_train_evaluate_predict_on_ag_news(agnews_model, tmp_path):
    result = run_cli(
        "evaluate",
        "--model",
        str(agnews_model),
        "--data",
        str(SHARED_DATA / "ag_news"),
        "--split",
        "test",
        "--limit",
        "400",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 400
    assert metrics["accuracy"] > 0.7  # 400 examples x 2 epochs: far above chance (0.25)
    texts = ["Striker scores twice as champions win the derby", "Central bank raises interest rates again"]
    result = run_cli("predict", "--model", str(agnews_model), "--json", *texts)
    labels = [json.loads(line)["label"] for line in result.stdout.splitlines()]
    assert labels[0] == "Sports"


def test_plain_peft_loads_the_minilm_adapter(agnews_model, tmp_path):
    import adaptext
    from adaptext.card import MEAN_POOL_SNIPPET
    from adaptext.models import ALIASES
    from test_portable import MINILM_HUB_ID, hub_cache

    texts = ["Oil prices climb on supply fears", "New chip doubles battery life"]
    code = (
        "import json,sys,torch\n"
        "from peft import AutoPeftModelForSequenceClassification\n"
        "from transformers import AutoTokenizer\n"
        f"m = AutoPeftModelForSequenceClassification.from_pretrained({str(agnews_model)!r}, num_labels=4).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(agnews_model)!r})\n"
        # MiniLM is mean-pooled (adaptext.pooling): the model card's hook puts that back in plain transformers
        + MEAN_POOL_SNIPPET
        + f"with torch.no_grad(): print(json.dumps(m(**t({texts!r}, padding=True, return_tensors='pt')).logits.tolist()))\n"
    ).replace("model.get_base_model()", "m.get_base_model()")
    # The adapter names its base by Hub id: give plain peft the Hugging Face cache a download leaves.
    hf_home = hub_cache(tmp_path / "hf-home", MINILM_HUB_ID, Path(ALIASES["minilm"].resolve()))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode == 0, plain.stderr
    plain_logits = np.array(json.loads(plain.stdout))
    ours = adaptext.load(agnews_model, precision="fp32").logits(texts)  # plain peft runs fp32
    np.testing.assert_allclose(plain_logits, ours, atol=1e-4)
    # In the run's precision (bf16 on AMX CPUs): within that precision's bound of plain peft's fp32.
    assert_logits_close(adaptext.load(agnews_model).logits(texts), plain_logits)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset,train_size,test_n,floor",
    [
        ("ag_news", 1250, 7600, 0.885),
        pytest.param("imdb", 1000, 25000, 0.85, marks=pytest.mark.xfail(
            reason="measured 0.8397 at the default max length 256 (docs/RESULTS.md); issue #2 still open on this")),
    ],
)  # fmt: skip
def test_acceptance_defaults_on_full_test_sets(tmp_path, dataset, train_size, test_n, floor):
    """Issue #2 acceptance: default settings (3 epochs), evaluated on the complete test split."""
    output = tmp_path / dataset
    result = run_cli(
        "train",
        "--data",
        str(SHARED_DATA / dataset),
        "--train-size",
        str(train_size),
        "--output",
        str(output),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    result = run_cli("evaluate", "--model", str(output), "--split", "test", "--json")
    metrics = json.loads(result.stdout)
    assert metrics["n"] == test_n and metrics["accuracy"] >= floor


@pytest.fixture(scope="module")
def sst2_model(tmp_path_factory):
    output = tmp_path_factory.mktemp("e2e") / "sst2"
    # fmt: off
    result = run_cli("train", "--data", str(SHARED_DATA / "sst2"), "--train-size", "300", "--eval-size", "80",
                     "--test-size", "80", "--epochs", "1", "--min-steps", "0", "--max-length", "64", "--seed", "1", "--output", str(output),
                     "--quiet")
    # fmt: on
    assert result.returncode == 0, result.stderr
    return output


def test_serve_two_datasets_on_one_minilm_answers_like_predict(agnews_model, sst2_model, tmp_path):
    """AG News (4 labels) and SST-2 (2 labels) adapters in one server, one copy of MiniLM, same answers as predict."""
    import pandas as pd

    import adaptext
    from test_serve import Server

    texts = {
        "agnews": pd.read_parquet(SHARED_DATA / "ag_news" / "test.parquet")["text"].tolist()[:6],
        "sst2": pd.read_parquet(SHARED_DATA / "sst2" / "validation.parquet")["text"].tolist()[:6],
    }
    server = Server(["--adapters", f"agnews={agnews_model}", f"sst2={sst2_model}"], env={"ADAPTEXT_SERVE_TOKEN": ""})
    try:
        status, listing = server.get("/v1/adapters", token=None)
        assert status == 200
        assert len(listing["bases"]) == 1 and sorted(listing["bases"][0]["adapters"]) == ["agnews", "sst2"]
        assert 22_000_000 < listing["bases"][0]["parameters"] < 23_500_000  # MiniLM's weights, held once
        labels = {a["name"]: a["labels"] for a in listing["adapters"]}
        assert len(labels["agnews"]) == 4 and len(labels["sst2"]) == 2
        for name, folder in (("agnews", agnews_model), ("sst2", sst2_model)):
            status, body = server.post("/v1/classify", {"adapter": name, "texts": texts[name]}, token=None)
            assert status == 200, body
            cli = run_cli("predict", "--model", str(folder), "--json", *texts[name])
            assert cli.returncode == 0, cli.stderr
            expected = [json.loads(line) for line in cli.stdout.splitlines()]
            assert body["labels"] == labels[name]
            assert body["precision"] == expected[0]["precision"]
            logits = adaptext.load(folder).logits(texts[name])  # the bounds of a bf16 comparison
            assert_labels_agree([g["label"] for g in body["results"]], [w["label"] for w in expected], logits)
            assert_probs_close(
                [[g["probabilities"][label] for label in body["labels"]] for g in body["results"]],
                [[w["probabilities"][label] for label in body["labels"]] for w in expected],
                logits,
                fp32=1e-4,
            )
    finally:
        server.stop()


def test_serve_load_benchmark_writes_its_figures(agnews_model, sst2_model, tmp_path):
    out = tmp_path / "load.json"
    # fmt: off
    result = subprocess.run(
        [sys.executable, "benchmarks/serve_load.py", "--adapters", str(agnews_model), str(sst2_model),
         "--duration", "4", "--clients", "8", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    # fmt: on
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    for key in ("requests_per_s", "p99_ms", "errors", "baseline_requests_per_s"):
        assert key in figures, key
    assert figures["errors"] == 0 and figures["requests_per_s"] > 0 and figures["baseline_requests_per_s"] > 0
    assert figures["batched"]["requests_per_batch"] > 1 and figures["naive"]["requests_per_batch"] == pytest.approx(1)
    assert "micro-batched / naive throughput" in result.stdout
