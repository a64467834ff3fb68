"""End to end on the real all-MiniLM-L6-v2 with slices of ../shared/data, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import SHARED_DATA, needs_shared_data, run_cli

pytestmark = [pytest.mark.e2e, needs_shared_data()]


@pytest.fixture(scope="module")
def agnews_model(tmp_path_factory):
    output = tmp_path_factory.mktemp("e2e") / "agnews"
    # fmt: off
    result = run_cli("train", "--data", str(SHARED_DATA / "ag_news"), "--train-size", "400", "--eval-size", "80",
                     "--epochs", "2", "--max-length", "64", "--seed", "1", "--output", str(output), "--quiet")
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


def test_plain_peft_loads_the_minilm_adapter(agnews_model):
    import adaptext

    texts = ["Oil prices climb on supply fears", "New chip doubles battery life"]
    code = (
        "import json,sys,torch\n"
        "from peft import AutoPeftModelForSequenceClassification\n"
        "from transformers import AutoTokenizer\n"
        f"m = AutoPeftModelForSequenceClassification.from_pretrained({str(agnews_model)!r}, num_labels=4).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(agnews_model)!r})\n"
        f"with torch.no_grad(): print(json.dumps(m(**t({texts!r}, padding=True, return_tensors='pt')).logits.tolist()))\n"
    )
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    ours = adaptext.load(agnews_model).logits(texts)
    np.testing.assert_allclose(np.array(json.loads(plain.stdout)), ours, atol=1e-4)


def test_demo_is_the_offline_main_job(tmp_path):
    result = run_cli("demo", "--output", str(tmp_path / "demo"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 200
    assert metrics["test"]["accuracy"] >= 0.85
    assert result.stdout.count("  ") >= 5  # sample predictions printed


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
