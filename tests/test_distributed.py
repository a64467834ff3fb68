"""Distributed training: `torchrun --nproc_per_node 2 -m adaptext train` on CPU (gloo) equals one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import adaptext
from conftest import assert_labels_agree, assert_logits_close, assert_metrics_reproduced, logit_bound, run_cli

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


@pytest.mark.processes
@pytest.mark.parity
def test_two_gloo_processes_train_like_one(no_dropout_bert, topic_dir, tmp_path, single_process, precision):
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
    _same_training(one, two, topic_dir)
    assert m1["test"]["accuracy"] > 0.5  # it learned something, so the comparison means something
    if precision == "fp32":
        assert [h["accuracy"] for h in m1["history"]] == [h["accuracy"] for h in m2["history"]]
        w1, w2 = (load_file(str(d / "adapter_model.safetensors")) for d in (one, two))
        for key in w1:
            torch.testing.assert_close(w1[key], w2[key], atol=1e-4, rtol=1e-3)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no staging directory left by rank 1


@pytest.mark.processes
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
    _same_training(whole, out, topic_dir)


def _same_training(one: Path, two: Path, topic_dir: Path) -> None:
    """Two runs of one training (one process and two, sharded or not, resumed or not) ended alike: in fp32 the
    same metrics (loss to 1e-4). In bf16 each process's rows round on their own (another batch shape), so the
    two models agree within the bound of adaptext.precision: their logits on the test texts, hence their
    losses within twice it and their labels but for near-ties."""
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["train"]["steps"] == m2["train"]["steps"]
    for split in ("validation", "test"):
        assert m1[split]["n"] == m2[split]["n"]  # sharded evaluation gathered every example
        assert m1[split]["precision"] == m2[split]["precision"]
    if m1["test"]["precision"] == "fp32":
        for split in ("validation", "test"):
            assert m1[split]["accuracy"] == m2[split]["accuracy"], split
            assert m1[split]["loss"] == pytest.approx(m2[split]["loss"], abs=1e-4), split
        return
    texts = pd.read_csv(topic_dir / "test.csv")["text"].tolist()
    logits1, logits2 = (adaptext.load(d).logits(texts) for d in (one, two))
    assert_logits_close(logits2, logits1)
    assert_labels_agree(logits2.argmax(1).tolist(), logits1.argmax(1).tolist(), logits1)
    for split in ("validation", "test"):
        assert m1[split]["loss"] == pytest.approx(m2[split]["loss"], abs=2 * logit_bound(logits1)), split


@pytest.mark.processes
@pytest.mark.parity
def test_fsdp_full_sharding_trains_like_one_process_and_saves_the_whole_head(
    no_dropout_bert, topic_dir, tmp_path, single_process
):
    one, _ = single_process
    two = tmp_path / "fsdp"
    run = torchrun("train", "--data", str(topic_dir), "--model", str(no_dropout_bert), *ARGS, "--shard", "full",
                   "--output", str(two))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "shard: FSDP full over 2 processes (weights, gradients and optimiser state; 3 units: 1 BertEmbeddings, 2 BertLayer, and the root)"
        in run.stdout
    )
    _same_training(one, two, topic_dir)
    # The saved adapter is whole, the classifier head included (a shard of it would not even load), and it
    # holds the weights one process learns.
    w1, w2 = (load_file(str(d / "adapter_model.safetensors")) for d in (one, two))
    assert sorted(w1) == sorted(w2) and any("classifier" in key for key in w2)
    for key in w1:
        assert w1[key].shape == w2[key].shape, key
        if precision_of(one) == "fp32":  # in bf16: the logits, compared above
            torch.testing.assert_close(w1[key], w2[key], atol=1e-4, rtol=1e-3)
    assert yaml.safe_load((two / "run_config.yaml").read_text())["shard"] == "full"
    assert run.stdout.count("epoch 6.00") == 1  # rank 0 alone prints


def precision_of(folder: Path) -> str:
    return json.loads((folder / "metrics.json").read_text())["test"]["precision"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.processes
def test_accelerate_launch_with_an_fsdp_config_shards_and_resumes_after_a_kill(
    no_dropout_bert, topic_dir, tmp_path, single_process
):
    """A real `accelerate launch` with an FSDP2 config (reshard_after_forward false: ZeRO-2-like grad-op);
    a kill -9 in the middle of the second checkpoint save, then --resume: the run ends as the
    uninterrupted one-process run does."""
    out = tmp_path / "run"
    common = ("train", "--data", str(topic_dir), "--model", str(no_dropout_bert), *ARGS, "--output", str(out),
              "--checkpoint-steps", "5")  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
              "--fsdp_reshard_after_forward", "false", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "adaptext"]  # fmt: skip

    def accelerate(*args: str, **env: str) -> subprocess.CompletedProcess:
        port = ["--main_process_port", str(free_port())]
        command = [*launch[:3], *port, *launch[3:], *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **env})

    killed = accelerate(*common, ADAPTEXT_FAULT_KILL_IN_SAVE="2")
    assert killed.returncode != 0 and (out / "checkpoint" / "state.pt").is_file(), killed.stderr[-2000:]
    assert "shard: FSDP grad-op over 2 processes" in killed.stdout
    resumed = accelerate(*common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from_step"] == 5
    _same_training(single_process[0], out, topic_dir)


@pytest.mark.processes
def test_a_sharded_checkpoint_is_not_resumed_unsharded(no_dropout_bert, topic_dir, tmp_path):
    out = tmp_path / "run"
    common = ("train", "--data", str(topic_dir), "--model", str(no_dropout_bert), *ARGS, "--epochs", "1",
              "--output", str(out), "--checkpoint-steps", "3")  # fmt: skip
    env = {**os.environ, "ADAPTEXT_FAULT_KILL_IN_SAVE": "2"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adaptext"]
    killed = subprocess.run([*launch, *common, "--shard", "full"], capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode != 0 and (out / "checkpoint" / "state.pt").is_file()
    unsharded = torchrun(*common, "--shard", "none", "--resume")
    assert unsharded.returncode != 0
    assert "these differ (shard: 'full' -> 'none')" in unsharded.stdout + unsharded.stderr


@pytest.mark.processes
@pytest.mark.parity
def test_fsdp_full_fine_tuning_saves_a_model_that_evaluates_as_trained(no_dropout_bert, topic_dir, tmp_path):
    out = tmp_path / "full"
    run = torchrun("train", "--data", str(topic_dir), "--model", str(no_dropout_bert), *ARGS, "--method", "full",
                   "--lr", "5e-4", "--shard", "full", "--output", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    trained = json.loads((out / "metrics.json").read_text())["test"]
    evaluated = run_cli("evaluate", "--model", str(out), "--data", str(topic_dir / "test.csv"), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert trained["accuracy"] > 0.5
    logits = adaptext.load(out).logits(pd.read_csv(topic_dir / "test.csv")["text"].tolist())
    assert_metrics_reproduced(json.loads(evaluated.stdout), trained, logits)


@pytest.mark.parametrize(
    ("environment", "shard", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "none", "does not run DeepSpeed: for ZeRO-3-style sharding use"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "none", "hybrid sharding"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "none", "fsdp_offload_params"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "ZERO9"}, "none", "unknown FSDP_SHARDING_STRATEGY"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "full", "contradicts"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "none", "activation checkpointing"),
    ],
)
def test_sharding_settings_adaptext_does_not_carry_out_are_refused_in_one_line(
    monkeypatch, environment, shard, message
):
    from adaptext import distributed
    from adaptext.errors import AdaptextError

    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(AdaptextError, match=message) as refused:
        distributed.setup(shard)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, "none"),
        ({"ACCELERATE_USE_FSDP": "true"}, "full"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "2"}, "grad-op"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "none"),
        (
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_RESHARD_AFTER_FORWARD": "false",
                "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
            },
            "grad-op",
        ),  # what accelerate 1.15 sets for an FSDP2 config
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, "full"),
    ],
)
def test_accelerate_fsdp_configs_map_to_a_sharding(monkeypatch, environment, expected):
    from adaptext import distributed

    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert distributed.setup("none").shard == expected
