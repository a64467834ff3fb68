"""README's set-up commands and CI stay in sync; every documented flag exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from adaptext.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


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


def test_every_flag_in_readme_exists():
    text = (ROOT / "README.md").read_text()
    parser = build_parser()
    known = set()
    for action in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001
        for option in action._actions:  # noqa: SLF001
            known.update(option.option_strings)
    for script in ("run.py", "serve_load.py"):  # the benchmark commands' flags
        bench = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True
        )
        assert bench.returncode == 0, bench.stderr
        known.update(re.findall(r"(--[a-z][a-z0-9-]+)", bench.stdout))
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+)", text))
    launchers = {  # torchrun's and accelerate launch's own
        "--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint",
        "--num_processes", "--use_fsdp", "--fsdp_version", "--fsdp_reshard_after_forward",
    }  # fmt: skip
    pip_pytest = {"--no-deps", "--quiet", "--upgrade", "--index-url", "--dist"}  # pip's and pytest-xdist's own
    assert used - known - launchers - pip_pytest == set()
