"""Checkpoints of an unfinished run, so that ``adaptext train ... --resume`` continues after a crash.

A checkpoint is one file, ``OUTPUT/checkpoint/state.pt``: the trainable tensors, the optimiser,
the RNG states, the position in the data (the shuffling RNG at the start of the current epoch and
how many of its batches are done), the evaluations so far and the best state. It is written to a
temporary file, flushed to disk and renamed over the previous one, so a crash at any moment —
during a save included — leaves the previous checkpoint whole. Resuming restores all of it and
replays the same batches, so a resumed run ends where the uninterrupted run would have.

Only tensors and plain containers are stored (``torch.load(weights_only=True)`` reads them back).
The finished model replaces the whole output directory, checkpoint included.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptext import artifacts
from adaptext.artifacts import atomic_path
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError

FOLDER = "checkpoint"
STATE_FILE = "state.pt"
FORMAT = 1
AUTO_SECONDS = 60.0  # "about once a minute of work" when --checkpoint-steps is not given
# Options that may differ between the interrupted run and its resumption (they do not change the result).
FREE_OPTIONS = ("output", "overwrite", "resume", "checkpoint_steps", "tensorboard", "report_to", "log_every")


class UnusableCheckpoint(AdaptextError):
    """A checkpoint that cannot be resumed. The message says what ``adaptext train --resume`` should do;
    ``reason`` is the cause alone ("cannot be read (EOFError)"), for callers that handle it themselves
    (``adaptext tune`` trains the trial from scratch)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def state_path(output: Path) -> Path:
    return output / FOLDER / STATE_FILE


def identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in FREE_OPTIONS}


@dataclass
class Checkpointer:
    """Decides when to save and saves atomically; ``every_steps`` None = about every minute, 0 = epoch ends only."""

    output: Path
    config: dict[str, Any]
    every_steps: int | None = None
    last_save: float = field(default_factory=time.perf_counter)
    saves: int = 0

    @property
    def path(self) -> Path:
        return state_path(self.output)

    def due(self, step: int, epoch_end: bool) -> bool:
        if epoch_end:
            return True
        if self.every_steps is None:
            return time.perf_counter() - self.last_save >= AUTO_SECONDS
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, state: dict[str, Any]) -> None:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            with tmp.open("wb") as handle:
                torch.save({"format": FORMAT, "config": identity(self.config), **state}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self.saves += 1
            if os.environ.get("ADAPTEXT_FAULT_KILL_IN_SAVE") == str(self.saves):
                # Fault injection for the crash-safety test: die like `kill -9` between writing and renaming.
                os.kill(os.getpid(), signal.SIGKILL)
        self.last_save = time.perf_counter()


def load(output: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint in ``output``, checked against the options of the run that resumes it."""
    path = state_path(output)
    if not path.is_file():
        raise AdaptextError(f"no checkpoint in {output} to resume; run without --resume to start training")
    for stale in path.parent.glob(f".{STATE_FILE}.partial-*"):  # a save that a crash cut short
        stale.unlink(missing_ok=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable file gets the same answer
        unreadable = f"cannot be read ({type(exc).__name__})"
        raise UnusableCheckpoint(f"checkpoint {path} {unreadable}; start over with --overwrite", unreadable) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        foreign = "was written by another adaptext version"
        raise UnusableCheckpoint(f"checkpoint {path} {foreign}; start over with --overwrite", foreign)
    saved, now = state["config"], identity(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise UnusableCheckpoint(
            f"--resume needs the options of the interrupted run; these differ ({diff}); "
            "pass the same options, or --overwrite to start over",
            f"was made with other options ({diff})",
        )
    return state


def describe(output: Path) -> str | None:
    """``step S`` of the checkpoint in ``output``, or None when there is none."""
    path = state_path(output)
    if not path.is_file():
        return None
    try:
        step = torch.load(path, map_location="cpu", weights_only=True).get("step")
    except Exception:  # noqa: BLE001
        return "an unreadable checkpoint"
    return f"a checkpoint at step {step}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def python_rng_to_tensor(rng: random.Random) -> dict[str, Any]:
    """``random.Random`` state as plain values (the weights-only loader accepts tuples of ints)."""
    version, internal, gauss = rng.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def python_rng_from_tensor(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss"])


def prepare_output(cfg: TrainConfig, echo: Callable[[str], None]) -> tuple[Path, dict[str, Any] | None]:
    """The output directory, checked; with --resume, the checkpoint found in it (options compared)."""
    if cfg.resume:
        output = Path(cfg.output).expanduser()
        if (output / artifacts.META_FILE).is_file() and describe(output) is None:
            raise AdaptextError(f"{output} holds a finished model: nothing to resume (--overwrite trains it again)")
        state = load(output, cfg.to_dict())
        echo(f"resume: continuing from the checkpoint at step {state['step']} in {output}")
        return output, state
    path = Path(cfg.output).expanduser()
    found = describe(path) if path.is_dir() else None
    if found and not cfg.overwrite:
        raise AdaptextError(
            f"{path} holds {found} of an unfinished run; pass --resume to continue it or --overwrite to start over"
        )
    output = artifacts.check_output(cfg.output, cfg.overwrite)
    if found:  # --overwrite: the old run's checkpoint must not be resumed into this one
        shutil.rmtree(output / FOLDER, ignore_errors=True)
    return output, None
