"""Shared fixtures: tiny random models per architecture, small datasets, a CLI runner."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

# No test may reach the network: the Hub is unreachable here, and a test that silently tried it
# would hang on retries instead of failing fast. Set before huggingface_hub is imported (it reads
# these once); subprocesses inherit them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (-n 2: one worker per core) every process computes on one thread: two workers with
# two OpenMP threads each on two cores spin against each other and run many times slower. Subprocesses
# (the CLI, servers, torchrun) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ARCHS, make_tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TOPICS = {
    "sports": ["match", "goal", "team", "coach", "league", "score", "season", "player"],
    "money": ["market", "price", "bank", "stock", "profit", "trade", "budget", "sales"],
    "space": ["planet", "rocket", "orbit", "star", "moon", "telescope", "comet", "galaxy"],
}


def topic_rows(n_per_class: int, seed: int = 0, classes: tuple[str, ...] = ("sports", "money", "space")):
    """Short synthetic texts whose words give away the class: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    rows = []
    for label in classes:
        words = TOPICS[label]
        for _ in range(n_per_class):
            length = rng.randint(3, 14)
            rows.append({"text": " ".join(rng.choice(words) for _ in range(length)), "label": label})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def topic_dir(tmp_path_factory) -> Path:
    """A split directory (train.csv, test.csv) with string labels."""
    folder = tmp_path_factory.mktemp("topics")
    pd.DataFrame(topic_rows(40, seed=1)).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(topic_rows(10, seed=2)).to_csv(folder / "test.csv", index=False)
    return folder


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None, timeout: int = 600):
    """Run the real CLI in a fresh process: `python -m adaptext ...`."""
    return subprocess.run(
        [sys.executable, "-m", "adaptext", *args], capture_output=True, text=True, cwd=cwd, input=input, timeout=timeout
    )


def needs_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
