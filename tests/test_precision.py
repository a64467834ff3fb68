"""bf16 on any CPU, whatever precision the test run forces: every result says which precision made it, and
two computations of the same numbers agree within the bound of adaptext.precision."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import adaptext
from adaptext import api
from adaptext.export import export_onnx
from adaptext.serve.registry import Registry
from conftest import assert_labels_agree, assert_logits_close, assert_metrics_reproduced, assert_probs_close, run_cli

TEXTS = ["goal match team coach", "market price bank", "planet rocket orbit star moon", "league", "profit comet"]


@pytest.fixture(scope="module")
def bf16_model(tiny_models, topic_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("bf16") / "model"
    return api.train(
        data=str(topic_dir), model=str(tiny_models["bert"]), output=str(output), epochs=3, batch_size=8,
        max_length=32, lr=2e-2, seed=3, precision="bf16", progress=False, echo=lambda line: None,
    )  # fmt: skip


def test_a_bf16_run_says_so_everywhere(bf16_model):
    folder = bf16_model.output
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["train"]["precision"] == metrics["validation"]["precision"] == metrics["test"]["precision"] == "bf16"
    assert json.loads((folder / "adaptext.json").read_text())["precision"] == "bf16"
    assert "Computed in bf16; an evaluation in bf16 reproduces them" in (folder / "README.md").read_text()


def test_reload_in_bf16_reproduces_the_training_time_metrics(bf16_model, topic_dir):
    again = adaptext.evaluate(bf16_model.output, str(topic_dir), split="test", precision="bf16")
    assert again["precision"] == "bf16"
    texts = pd.read_csv(topic_dir / "test.csv")["text"].tolist()
    logits = adaptext.load(bf16_model.output, precision="bf16").logits(texts)
    assert_metrics_reproduced(again, bf16_model.metrics["test"], logits, precision="bf16")


def test_bf16_and_fp32_agree_within_the_bound(bf16_model):
    bf16 = adaptext.load(bf16_model.output, precision="bf16")
    fp32 = adaptext.load(bf16_model.output, precision="fp32")
    assert (bf16.precision, fp32.precision) == ("bf16", "fp32")
    reference = fp32.logits(TEXTS)
    assert_logits_close(bf16.logits(TEXTS), reference, precision="bf16")
    # Unmerged LoRA (as serve runs it) and one text at a time round differently: still within the bound.
    assert_logits_close(
        adaptext.load(bf16_model.output, precision="bf16", merge=False).logits(TEXTS), reference, precision="bf16"
    )
    alone = np.stack([bf16.logits([t])[0] for t in TEXTS])
    assert_logits_close(alone, reference, precision="bf16")


def test_predict_onnx_and_serve_agree_with_bf16_within_the_bound(bf16_model):
    folder = bf16_model.output
    bf16 = adaptext.load(folder, precision="bf16")
    logits, probs = bf16.logits(TEXTS), bf16.predict_proba(TEXTS)

    cli = run_cli("predict", "--model", str(folder), "--precision", "bf16", "--json", *TEXTS)
    assert cli.returncode == 0, cli.stderr
    rows = [json.loads(line) for line in cli.stdout.splitlines()]
    assert {r["precision"] for r in rows} == {"bf16"}
    assert_labels_agree([r["label"] for r in rows], [r["label"] for r in bf16.predict(TEXTS)], logits, "bf16")

    export_onnx(folder)
    onnx = adaptext.load(folder, backend="onnx")
    assert onnx.precision == "fp32"
    assert_probs_close(onnx.predict_proba(TEXTS), probs, logits, precision="bf16")

    registry = Registry([folder.parent], precision="bf16")
    registry.load(folder.name)
    described = registry.describe()[0]
    assert described["precision"] == described["metrics_precision"] == "bf16"
    # A mixed request of repeated and reordered texts: other batch shapes, the same answers within the bound.
    mixed = TEXTS[::-1] + TEXTS[:2]
    served = registry.probabilities([(folder.name, mixed)])[0]
    assert_probs_close(served, bf16.predict_proba(mixed), bf16.logits(mixed), precision="bf16")


def test_the_environment_forces_a_precision_for_a_whole_cli_run(bf16_model, topic_dir):
    env_run = run_cli(
        "evaluate",
        "--model",
        str(bf16_model.output),
        "--data",
        str(topic_dir),
        "--json",
        env={"ADAPTEXT_PRECISION": "bf16"},
    )
    assert env_run.returncode == 0, env_run.stderr
    assert json.loads(env_run.stdout)["precision"] == "bf16"
    explicit = run_cli(
        "evaluate",
        "--model",
        str(bf16_model.output),
        "--precision",
        "fp32",
        "--json",
        env={"ADAPTEXT_PRECISION": "bf16"},
    )
    assert json.loads(explicit.stdout)["precision"] == "fp32"  # an explicit --precision wins
    bad = run_cli("predict", "--model", str(bf16_model.output), "x", env={"ADAPTEXT_PRECISION": "fp8"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: ADAPTEXT_PRECISION='fp8' is not one of fp32, bf16, fp16, auto; fix or unset it"
    ]
