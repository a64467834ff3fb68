"""Shared fixtures: tiny random models per architecture, small datasets, a CLI runner."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import subprocess
import sys
import traceback
from pathlib import Path

# No test may reach the network: the Hub is unreachable here, and a test that silently tried it
# would hang on retries instead of failing fast. Set before huggingface_hub is imported (it reads
# these once); subprocesses inherit them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token cache entries (adaptext.token_store) of this run go to a scratch folder, not the user's ~/.cache.
if "ADAPTEXT_TOKEN_CACHE" not in os.environ:
    import tempfile

    os.environ["ADAPTEXT_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="adaptext-token-cache-")
# Under pytest-xdist (-n 2: one worker per core) every process computes on one thread: two workers with
# two OpenMP threads each on two cores spin against each other and run many times slower. Subprocesses
# (the CLI, servers, torchrun) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
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
def trained_tiny(tiny_models, topic_dir, tmp_path_factory) -> Path:
    """A tiny BERT LoRA classifier trained one epoch on ``topic_dir``, saved: for tests that only predict."""
    from adaptext import api

    output = tmp_path_factory.mktemp("trained-tiny") / "model"
    api.train(data=str(topic_dir), model=str(tiny_models["bert"]), output=str(output), epochs=1, batch_size=8,
              max_length=32, seed=3, progress=False, echo=lambda line: None)  # fmt: skip
    return output


@pytest.fixture(scope="session")
def topic_dir(tmp_path_factory) -> Path:
    """A split directory (train.csv, validation.csv, test.csv) with string labels. The validation file is
    explicit: 120 training rows are too few to carve one from (--validation-min-train)."""
    folder = tmp_path_factory.mktemp("topics")
    pd.DataFrame(topic_rows(40, seed=1)).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(topic_rows(5, seed=3)).to_csv(folder / "validation.csv", index=False)
    pd.DataFrame(topic_rows(10, seed=2)).to_csv(folder / "test.csv", index=False)
    return folder


# ---------------------------------------------------------------- precision
# `pytest --precision bf16` runs every test in bf16: it sets ADAPTEXT_PRECISION, which decides what
# `--precision auto` means in this process and in every subprocess (CLI runs, servers, torchrun). The
# default is fp32, the same on every CPU; .ci/run runs the parity tests (-m parity) again in bf16.
# Parity tests compare through the helpers below, whose bounds come from adaptext.precision.


def pytest_addoption(parser):
    parser.addoption(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "auto"),
        help="what --precision auto means for the whole run (ADAPTEXT_PRECISION); auto: this machine's choice",
    )


def pytest_configure(config):
    os.environ["ADAPTEXT_PRECISION"] = config.getoption("--precision")


# The heaviest test files first (seconds summed from a `--durations` run on 2 cores, heaviest first), so that
# under `-n auto --dist loadfile` neither worker is left running a long file at the end while the other idles.
# pyproject's addopts turns off xdist's own reordering (most tests first), which put these few-test files last.
HEAVY_FILES = (
    "test_benchmarks.py", "test_e2e.py", "test_distributed.py", "test_fewshot.py", "test_e2e_more.py",
    "test_compare.py", "test_export.py", "test_bulk.py", "test_ray.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))  # stable: a file's own order kept


def pytest_report_header(config):
    return f"adaptext precision: {run_precision()} (--precision {config.getoption('--precision')})"


def run_precision() -> str:
    """The precision `auto` resolves to in this test run."""
    import torch

    from adaptext.precision import resolve

    return resolve("auto", torch.device("cpu"))


@pytest.fixture(scope="session")
def precision() -> str:
    return run_precision()


def logit_bound(reference, precision: str | None = None, fp32: float = 1e-4) -> float:
    """How far logits (or regression values) of two evaluations may differ: ``fp32`` in fp32, else the
    documented bound of adaptext.precision for ``reference``."""
    from adaptext.precision import logit_bound as bound

    precision = precision or run_precision()
    return fp32 if precision == "fp32" else bound(precision, np.asarray(reference))


def assert_logits_close(actual, expected, precision: str | None = None, fp32: float = 1e-4, err_msg: str = ""):
    bound = logit_bound(expected, precision, fp32)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=bound, err_msg=err_msg)


def assert_probs_close(actual, expected, logits, precision: str | None = None, fp32: float = 2e-5, err_msg=""):
    """Probabilities (softmax or sigmoid) from logits within the bound move at most half of it."""
    precision = precision or run_precision()
    bound = fp32 if precision == "fp32" else logit_bound(logits, precision) / 2
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=bound, err_msg=err_msg)


def assert_labels_agree(actual: list, expected: list, logits, precision: str | None = None):
    """Labels equal; in bf16, equal on every row whose top two logits are further apart than twice the
    bound (a near-tie may go either way)."""
    precision = precision or run_precision()
    if precision == "fp32":
        assert list(actual) == list(expected)
        return
    from adaptext.precision import decided_rows

    decided = decided_rows(np.asarray(logits), logit_bound(logits, precision))
    mismatched = [i for i, (a, e) in enumerate(zip(actual, expected)) if a != e and decided[i]]
    assert not mismatched, f"labels differ on decided rows {mismatched}: {actual} vs {expected}"


def assert_metrics_reproduced(again: dict, before: dict, logits, precision: str | None = None):
    """Single-label metrics of one split scored twice (say, at training time and after a reload; ``before`` in
    the run's precision): equal in fp32 (loss to 1e-4); in bf16 the loss within twice the logit bound and the
    accuracy within the near-ties of ``logits`` (that split's logits), which alone may change a label."""
    precision = precision or run_precision()
    assert before["precision"] == precision
    if precision == "fp32":
        assert again["accuracy"] == before["accuracy"]
        assert again["loss"] == pytest.approx(before["loss"], abs=1e-4)
        assert again["confusion_matrix"] == before["confusion_matrix"]
        return
    from adaptext.precision import decided_rows

    bound = logit_bound(logits, precision)
    near_ties = int((~decided_rows(np.asarray(logits), bound)).sum())
    assert abs(again["accuracy"] - before["accuracy"]) <= near_ties / len(logits) + 1e-12
    assert again["loss"] == pytest.approx(before["loss"], abs=2 * bound)
    if not near_ties:
        assert again["confusion_matrix"] == before["confusion_matrix"]


@dataclasses.dataclass
class CliResult:
    """What a shell sees of one `adaptext ...` command: exit status, stdout, stderr."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_cli(
    *args: str, cwd: Path | None = None, input: str | None = None, timeout: int = 600, env: dict | None = None,
    fresh: bool = False,
) -> CliResult | subprocess.CompletedProcess:  # fmt: skip
    """Run the real CLI: ``adaptext.cli.main(args)`` in this process, with stdin, stdout, stderr, the working
    directory and ``env`` (variables added to ours) swapped in for the call, and the exit status a shell would
    see (argparse's 2, an AdaptextError's code, 1 and the traceback for a crash). In-process saves the ~5 s
    each fresh interpreter spends importing torch. ``fresh=True`` runs ``python -m adaptext`` in a new
    process instead: for what only a process shows (start-up imports, signals, what libraries log to the
    real stderr)."""
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "adaptext", *args], capture_output=True, text=True, cwd=cwd, input=input,
            timeout=timeout, env={**os.environ, **env} if env else None,
        )  # fmt: skip
    from adaptext import cli

    out, err = io.StringIO(), io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO((input or "").encode("utf-8")), encoding="utf-8")
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        sys.stdin = stdin
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except Exception:  # a crash: what the interpreter would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        sys.stdin = saved_stdin
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return CliResult([str(a) for a in args], code, out.getvalue(), err.getvalue())


def needs_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
