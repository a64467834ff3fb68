"""docs/: every command's options are documented on its page; every relative link and anchor resolves."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from adaptext.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PAGE_OF = {
    "train": "train.md",
    "demo": "train.md",  # the same command under another name, with train's flags
    "evaluate": "predict.md",
    "predict": "predict.md",
    "compare": "compare.md",  # its own flags; the training flags it shares are on train.md
    "tune": "tune.md",  # likewise
    "export": "export.md",
    "serve": "serve.md",
}
SHARES_TRAIN_FLAGS = ("compare", "tune")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string but -h/--help; of a --x/--no-x pair, --x."""
    found = set()
    for action in parser._actions:  # noqa: SLF001
        strings = [s for s in action.option_strings if s not in ("-h", "--help")]
        if isinstance(action, argparse.BooleanOptionalAction):
            strings = [s for s in strings if not s.startswith("--no-")]
        found.update(strings)
    return found


def test_every_subcommand_has_a_page():
    assert set(subcommands()) == set(PAGE_OF), "a command was added or removed: give it a page in PAGE_OF"


@pytest.mark.parametrize("command", sorted(PAGE_OF))
def test_every_option_is_documented_on_its_page(command):
    parsers = subcommands()
    required = option_strings(parsers[command])
    if command in SHARES_TRAIN_FLAGS:
        required -= option_strings(parsers["train"])
    page = DOCS / PAGE_OF[command]
    assert page.is_file(), f"docs/{PAGE_OF[command]} (the page of adaptext {command}) is missing"
    text = page.read_text()
    missing = sorted(flag for flag in required if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text))
    assert not missing, f"adaptext {command}: {', '.join(missing)} not documented in docs/{PAGE_OF[command]}"


FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens and spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading outside code blocks; repeated headings get -1, -2... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """Relative link targets outside code blocks (http:, https: and mailto: links are not checked)."""
    return [
        target
        for target in LINK.findall(FENCE.sub("", path.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)
    ]


def test_slug_follows_github():
    assert slug("Checkpoints and `--resume`") == "checkpoints-and---resume"
    assert slug("Issue #6: long texts — IMDb at 128 tokens") == "issue-6-long-texts--imdb-at-128-tokens"
    assert slug("Few labels: 8 examples per class") == "few-labels-8-examples-per-class"


@pytest.mark.parametrize("page", MARKDOWN, ids=[p.relative_to(ROOT).as_posix() for p in MARKDOWN])
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        shown = destination.relative_to(ROOT) if ROOT in destination.parents else destination
        if not destination.exists():
            broken.append(f"{target} (no file {shown})")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target} (no heading with anchor #{anchor} in {shown})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_readme_links_every_docs_page():
    linked = {
        (ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md") if target.partition("#")[0]
    }
    missing = [f"docs/{page.name}" for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md does not link {', '.join(missing)}"
