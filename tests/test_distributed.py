"""Distributed training: `torchrun --nproc_per_node 2 -m adaptext train` on CPU (gloo) equals one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

# Global batch 8 (4 rows per process), an odd number of examples (a short last batch), 2 evaluations per epoch.
ARGS = ("--epochs", "6", "--batch-size", "8", "--max-length", "32", "--lr", "0.01", "--lora-r", "4",
        "--lora-dropout", "0", "--evals-per-epoch", "2", "--seed", "11", "--quiet")  # fmt: skip


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_models, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: then one process and two compute the same function, up to rounding."""
    folder = tmp_path_factory.mktemp("bert-no-dropout") / "bert"
    shutil.copytree(tiny_models["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "adaptext", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def single_process(no_dropout_bert, topic_dir, tmp_path_factory):
    one = tmp_path_factory.mktemp("single") / "one"
    single = run_cli("train", "--data", str(topic_dir), "--model", str(no_dropout_bert), *ARGS, "--output", str(one))
    assert single.returncode == 0, single.stderr
    return one, single


def test_two_gloo_processes_train_like_one(no_dropout_bert, topic_dir, tmp_path, single_process):
    two = tmp_path / "two"
    one, single = single_process
    common = ("train", "--data", str(topic_dir), "--model", str(no_dropout_bert), *ARGS)
    double = torchrun(*common, "--output", str(two))
    assert double.returncode == 0, double.stderr[-3000:]
    lines = double.stdout.splitlines()
    firsts = [line for line in lines if line.startswith(("saved: ", "data: "))]
    assert firsts == [line for line in single.stdout.splitlines() if line.startswith(("saved: ", "data: "))][:-1] + [
        f"saved: {two}"
    ]  # rank 0 alone speaks and writes
    assert "in 2 processes" in double.stdout
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["train"]["processes"] == 2 and m1["train"]["processes"] == 1
    assert m1["train"]["steps"] == m2["train"]["steps"]
    for split in ("validation", "test"):
        assert m1[split]["accuracy"] == m2[split]["accuracy"], split
        assert m1[split]["n"] == m2[split]["n"]  # sharded evaluation gathered every example
        assert m1[split]["loss"] == pytest.approx(m2[split]["loss"], abs=1e-4), split
    assert m1["test"]["accuracy"] > 0.5  # it learned something, so the comparison means something
    assert [h["accuracy"] for h in m1["history"]] == [h["accuracy"] for h in m2["history"]]
    w1, w2 = (load_file(str(d / "adapter_model.safetensors")) for d in (one, two))
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-4, rtol=1e-3)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no staging directory left by rank 1


def test_two_processes_resume_from_a_checkpoint(no_dropout_bert, topic_dir, tmp_path, single_process):
    out = tmp_path / "run"
    common = ("train", "--data", str(topic_dir), "--model", str(no_dropout_bert), *ARGS, "--output", str(out))

    env = {**os.environ, "ADAPTEXT_FAULT_KILL_IN_SAVE": "2"}
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adaptext",
         *common, "--checkpoint-steps", "5"], capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert killed.returncode != 0 and (out / "checkpoint" / "state.pt").is_file()
    resumed = torchrun(*common, "--checkpoint-steps", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = single_process[0]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (whole, out))
    assert m2["train"]["resumed_from_step"] == 5
    assert m1["test"]["accuracy"] == m2["test"]["accuracy"]
    assert m1["test"]["loss"] == pytest.approx(m2["test"]["loss"], abs=1e-4)


@pytest.mark.parametrize(
    ("variable", "engine"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_a_sharded_accelerate_launch_is_refused_not_run_unsharded(monkeypatch, variable, engine):
    from adaptext import distributed
    from adaptext.errors import AdaptextError

    monkeypatch.setenv(variable, "true")
    with pytest.raises(AdaptextError, match=f"asked for {engine}.*does not shard"):
        distributed.setup()
