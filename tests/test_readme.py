"""README's set-up commands and CI stay in sync; the README stays short; every documented flag exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from adaptext.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The benchmark scripts the docs show with their own flags (benchmarks/gpu.sh takes none).
BENCHMARK_SCRIPTS = ("run.py", "serve_load.py", "fewshot.py", "hf_baseline.py", "scale.py")
LAUNCHERS = {  # torchrun's and accelerate launch's own
    "--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint",
    "--num_processes", "--use_fsdp", "--fsdp_version", "--fsdp_reshard_after_forward",
    "--head", "--address",  # ray start's own
}  # fmt: skip
PIP_PYTEST = {"--no-deps", "--quiet", "--upgrade", "--index-url", "--dist", "--durations"}  # pip's and pytest's own


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- setup --> block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them():
    commands = readme_commands()
    assert len(commands) == 2
    install, tests = commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "CI must run the README's test command verbatim"
    for step in install.split(" && ")[:-1]:  # CI installs the same way; it skips only the demo run
        assert step.replace(".venv/bin/pip install", ".venv/bin/pip install --quiet") in ci or step in ci, step


def test_readme_is_at_most_200_lines():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move reference material into docs/ (at most 200)"


def known_flags() -> set[str]:
    parser = build_parser()
    known = set()
    for action in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001
        for option in action._actions:  # noqa: SLF001
            known.update(option.option_strings)
    for script in BENCHMARK_SCRIPTS:  # the benchmark commands' flags
        bench = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True
        )
        assert bench.returncode == 0, bench.stderr
        known.update(re.findall(r"(--[a-z][a-z0-9_-]+)", bench.stdout))
    return known | LAUNCHERS | PIP_PYTEST


@pytest.fixture(scope="module")
def known() -> set[str]:
    return known_flags()


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_flag_in_readme_and_docs_exists(page, known):
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+)", page.read_text()))
    unknown = sorted(used - known)
    assert not unknown, f"{page.relative_to(ROOT)} mentions flags no command has: {', '.join(unknown)}"
