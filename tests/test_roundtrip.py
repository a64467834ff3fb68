"""Train -> save -> reload (adaptext and plain peft, in fresh processes) -> identical predictions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import adaptext
from adaptext import api
from conftest import assert_labels_agree, assert_logits_close, assert_metrics_reproduced, run_cli
from tiny_models import ARCHS

PARITY = pytest.mark.parity  # compares two computations of the same numbers: run in fp32 and in bf16

PROBE_TEXTS = ["goal match team coach", "market price bank", "planet rocket orbit star moon", "league"]

PLAIN_PEFT = """
import json, sys, torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
folders, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for folder in folders:
    labels = json.load(open(folder + "/labels.json"))
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        folder, num_labels=labels["num_labels"], pad_token_id=labels["pad_token_id"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = labels["pad_token_id"]
    with torch.no_grad():
        out[folder] = [model(**tokenizer([t], return_tensors="pt")).logits[0].tolist() for t in texts]
print(json.dumps(out))
"""


def train_tiny(model_dir, data_dir, output, **kw):
    settings = dict(
        data=str(data_dir),
        model=str(model_dir),
        output=str(output),
        epochs=2,
        batch_size=8,
        max_length=32,
        lr=5e-3,
        seed=7,
    )
    settings.update(kw)
    return api.train(progress=False, echo=lambda line: None, **settings)


@pytest.fixture(scope="module")
def trained(tiny_models, topic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return {arch: train_tiny(tiny_models[arch], topic_dir, root / arch) for arch in ARCHS}


@PARITY
@pytest.mark.parametrize("arch", ARCHS)
def test_reload_reproduces_training_time_test_metrics(trained, topic_dir, arch, precision):
    outcome = trained[arch]
    # The test split was scored by the in-memory model right after training; scoring it again from
    # the saved directory, in the same precision, must give the same numbers, or the head/adapter was not
    # saved right (in bf16: within the bounds of adaptext.precision).
    again = adaptext.evaluate(outcome.output, str(topic_dir), split="test")
    assert outcome.meta["precision"] == outcome.metrics["test"]["precision"]
    logits = adaptext.load(outcome.output).logits(pd.read_csv(topic_dir / "test.csv")["text"].tolist())
    assert again["precision"] == precision
    assert_metrics_reproduced(again, outcome.metrics["test"], logits)


@pytest.fixture(scope="module")
def plain_peft_logits(trained):
    """Logits from plain peft + transformers, no adaptext, in one fresh process for every architecture."""
    folders = [str(trained[arch].output) for arch in ARCHS]
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, json.dumps(folders), json.dumps(PROBE_TEXTS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr
    return {folder: np.array(rows) for folder, rows in json.loads(plain.stdout).items()}


@pytest.mark.processes
@PARITY
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_process_adaptext_and_plain_peft_agree(trained, plain_peft_logits, arch, precision):
    folder = trained[arch].output
    merged = adaptext.load(folder).logits(PROBE_TEXTS)
    unmerged = adaptext.load(folder, merge=False).logits(PROBE_TEXTS)
    assert_logits_close(merged, unmerged)  # in the run's precision: merging LoRA changes the rounding only
    # Plain peft computes in fp32: adaptext in fp32 gives its numbers; in bf16, within bf16's bound of them.
    assert_logits_close(unmerged, plain_peft_logits[str(folder)])
    np.testing.assert_allclose(
        adaptext.load(folder, merge=False, precision="fp32").logits(PROBE_TEXTS),
        plain_peft_logits[str(folder)],
        atol=1e-4,
    )

    cli = run_cli("predict", "--model", str(folder), "--json", *PROBE_TEXTS)
    assert cli.returncode == 0, cli.stderr
    rows = [json.loads(line) for line in cli.stdout.splitlines()]
    assert {r["precision"] for r in rows} == {precision}
    expected = adaptext.load(folder).predict(PROBE_TEXTS)
    # Same precision, same batches: the CLI's fresh process computes the same numbers.
    assert_labels_agree([r["label"] for r in rows], [e["label"] for e in expected], merged)
    for row, exp in zip(rows, expected):
        assert row["score"] == pytest.approx(exp["score"], abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_artifacts_are_complete_and_safetensors_only(trained, arch):
    folder = trained[arch].output
    names = {p.name for p in folder.iterdir()}
    for required in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
        "adaptext.json",
        "metrics.json",
        "README.md",
        "run_config.yaml",
        "train_log.jsonl",
        "confusion_matrix.png",
        "tokenizer_config.json",
    ):
        assert required in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]
    labels = json.loads((folder / "labels.json").read_text())
    assert labels["id2label"] == {"0": "money", "1": "space", "2": "sports"}
    assert labels["problem_type"] == "single_label_classification"
    card = (folder / "README.md").read_text()
    assert (
        card.startswith("---\n") and "library_name: peft" in card and "AutoPeftModelForSequenceClassification" in card
    )
    meta = json.loads((folder / "adaptext.json").read_text())
    assert meta["params"]["adapter"] > 0 and meta["params"]["head"] > 0


@pytest.mark.parametrize("method", ["head", "full"])
def test_head_only_and_full_fine_tuning_round_trip(tiny_models, topic_dir, tmp_path, method):
    outcome = train_tiny(tiny_models["bert"], topic_dir, tmp_path / method, method=method)
    again = adaptext.evaluate(outcome.output, str(topic_dir), split="test")
    assert again["accuracy"] == outcome.metrics["test"]["accuracy"]
    params = outcome.meta["params"]
    if method == "head":
        assert params["adapter"] == 0 and params["head"] > 0
    else:
        assert params["trainable"] == params["total"]


def test_same_seed_same_result(tiny_models, topic_dir, tmp_path):
    a = train_tiny(tiny_models["bert"], topic_dir, tmp_path / "a", epochs=1)
    b = train_tiny(tiny_models["bert"], topic_dir, tmp_path / "b", epochs=1)
    np.testing.assert_array_equal(
        adaptext.load(a.output).logits(PROBE_TEXTS), adaptext.load(b.output).logits(PROBE_TEXTS)
    )
    assert a.metrics["history"] == b.metrics["history"]


def test_tiny_model_learns_the_topic_task(tiny_models, topic_dir, tmp_path):
    """The loop really optimises: loss falls and a separable task goes well above chance (1/3)."""
    outcome = train_tiny(tiny_models["bert"], topic_dir, tmp_path / "learn", epochs=8, lr=1e-2, lora_r=4, log_every=1)
    assert outcome.metrics["test"]["accuracy"] >= 0.6
    losses = [
        json.loads(line)["loss"]
        for line in (outcome.output / "train_log.jsonl").read_text().splitlines()
        if '"loss"' in line and '"eval"' not in line
    ]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5  # 120 rows since topic_dir has a validation file


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_empty_and_huge_texts_predict(trained, arch):
    rows = adaptext.load(trained[arch].output).predict(["", "x", "goal " * 100_000])
    assert [len(r["probabilities"]) for r in rows] == [3, 3, 3]
