"""Checkpoints and --resume: kill -9 a training run (midway, and inside a checkpoint save), resume, same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

# Dropout on (the RNG must be restored too), several checkpoints per epoch, a few epochs.
ARGS = ("--epochs", "4", "--batch-size", "4", "--max-length", "32", "--lr", "0.02", "--seed", "5",
        "--checkpoint-steps", "4", "--quiet")  # fmt: skip


def train_args(tiny_models, topic_dir, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--output", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, topic_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "whole"
    result = run_cli(*train_args(tiny_models, topic_dir, out))
    assert result.returncode == 0, result.stderr
    return out


def checkpoint_step(out: Path) -> int | None:
    path = out / "checkpoint" / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except Exception:  # noqa: BLE001 — not there yet, or being replaced this instant
        return None


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert ma[split]["accuracy"] == mb[split]["accuracy"], split
        assert ma[split]["loss"] == pytest.approx(mb[split]["loss"], abs=1e-5), split
    assert [h["accuracy"] for h in ma["history"]] == [h["accuracy"] for h in mb["history"]]
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-5)
    steps = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k in ("step", "loss", "eval")}
        for line in (d / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps(a) == steps(b)  # the log is whole: lines from before the crash, none twice


@pytest.mark.processes
def test_kill_9_midway_then_resume_ends_like_the_uninterrupted_run(tiny_models, topic_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptext", *train_args(tiny_models, topic_dir, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while (checkpoint_step(out) or 0) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = checkpoint_step(out)
    assert proc.returncode == -signal.SIGKILL and step is not None and step >= 8, proc.stderr.read()
    assert not (out / "adaptext.json").exists()  # no half-written model: only the checkpoint is there

    again = run_cli(*train_args(tiny_models, topic_dir, out))
    assert again.returncode == 2 and "--resume to continue it" in again.stderr
    changed = run_cli(*train_args(tiny_models, topic_dir, out), "--lr", "0.01", "--resume")
    assert changed.returncode == 2 and "lr: 0.02 -> 0.01" in changed.stderr, changed.stderr

    resumed = run_cli(*train_args(tiny_models, topic_dir, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["resumed_from_step"] >= 8
    assert not (out / "checkpoint").exists()  # the finished model replaced the checkpoint
    assert_same_run(uninterrupted, out)


@pytest.mark.processes
def test_kill_9_inside_a_checkpoint_save_keeps_the_previous_one(tiny_models, topic_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed-in-save"
    env = {**os.environ, "ADAPTEXT_FAULT_KILL_IN_SAVE": "3"}  # die between writing and renaming save #3
    proc = subprocess.run(
        [sys.executable, "-m", "adaptext", *train_args(tiny_models, topic_dir, out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = list((out / "checkpoint").glob(".state.pt.partial-*"))
    assert partial and checkpoint_step(out) == 8  # saves at steps 4, 8; the third was cut short
    resumed = run_cli(*train_args(tiny_models, topic_dir, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(uninterrupted, out)


@pytest.mark.processes
def test_resume_refusals_are_one_line(tiny_models, topic_dir, tmp_path, uninterrupted):
    cases = [
        (train_args(tiny_models, topic_dir, tmp_path / "nothing") + ["--resume"], "no checkpoint in"),
        (train_args(tiny_models, topic_dir, uninterrupted) + ["--resume"], "finished model: nothing to resume"),
        (train_args(tiny_models, topic_dir, tmp_path / "x") + ["--resume", "--overwrite"], "pass one of them"),
        (train_args(tiny_models, topic_dir, tmp_path / "x") + ["--checkpoint-steps", "-1"], "--checkpoint-steps"),
        (train_args(tiny_models, topic_dir, tmp_path / "x") + ["--resume", "--method", "adalora"], "adalora"),
    ]
    corrupt = tmp_path / "corrupt"
    (corrupt / "checkpoint").mkdir(parents=True)
    (corrupt / "checkpoint" / "state.pt").write_bytes(b"\x00not a checkpoint")
    cases.append((train_args(tiny_models, topic_dir, corrupt) + ["--resume"], "cannot be read"))
    for args, words in cases:
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], (args[-2:], result.stderr)
    # --overwrite starts over from a directory that holds a stale checkpoint
    fresh = run_cli(*train_args(tiny_models, topic_dir, corrupt), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert (corrupt / "adaptext.json").is_file() and not (corrupt / "checkpoint").exists()
