"""The documentation stays true to the repository: the CLI reference is the commands' own `--help`, every relative
link in README.md and docs/ resolves (file and heading), and README's test command is the one CI runs."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_what_the_script_writes_now():
    from moerun.cli import main

    gen = _gen_cli_docs()
    assert gen.PAGE.read_text(encoding="utf-8") == gen.render(main), (
        "docs/cli.md is out of date: run python scripts/gen_cli_docs.py")


def _tokens(path: Path):
    return MarkdownIt("commonmark", {"html": True}).enable("table").parse(path.read_text(encoding="utf-8"))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (letters, digits, '-', '_' and spaces
    kept), spaces to hyphens. Written by hand: markdown-it gives the heading text, not GitHub's anchor."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, repeats numbered as GitHub numbers them (-1, -2, ...)."""
    tokens = _tokens(path)
    seen: dict[str, int] = {}
    found = set()
    for i, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        text = "".join(child.content for child in tokens[i + 1].children
                       if child.type in ("text", "code_inline"))
        slug = github_slug(text)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(path: Path) -> list[str]:
    """Targets of the page's links and images (not those inside code)."""
    out = []
    for token in _tokens(path):
        for child in token.children or []:
            if child.type == "link_open":
                out.append(child.attrGet("href"))
            elif child.type == "image":
                out.append(child.attrGet("src"))
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            continue  # a web address: not checked (no network in tests)
        file = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif parts.fragment and (file.suffix != ".md" or parts.fragment not in anchors(file)):
            broken.append(f"{target}: no heading #{parts.fragment} in {os.path.relpath(file, page.parent)}")
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves():
    assert len(PAGES) > 10
    broken = {page.relative_to(ROOT).as_posix(): bad for page in PAGES if (bad := broken_links(page))}
    assert not broken, broken


def test_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "target.md").write_text("# Real-size conversion\n\n## What to serve on the CPU?\n\n## Notes\n\n"
                                        "## Notes\n")
    page = tmp_path / "page.md"
    page.write_text("[a](target.md#what-to-serve-on-the-cpu) [b](target.md#notes-1) [c](#here) `[d](nowhere.md)`\n\n"
                    "## Here\n\n[e](target.md#no-such-heading) ![f](missing.png) [g](https://example.com/x.md)\n\n"
                    "```\n[h](nowhere.md)\n```\n")
    assert broken_links(page) == ["target.md#no-such-heading: no heading #no-such-heading in target.md",
                                  "missing.png: no such file"]


def _commands(script: Path) -> list[str]:
    """A shell script's commands, less comments, `set` and `cd`."""
    lines = [line.strip() for line in script.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def test_readme_test_command_is_the_one_ci_runs():
    ci = _commands(ROOT / ".ci" / "run")
    assert ci == ["bash scripts/test.sh"], ci
    blocks = [t.content.strip() for t in _tokens(ROOT / "README.md") if t.type == "fence" and t.info == "bash"]
    assert ci[0] in blocks, "README's test command is not the one .ci/run runs"
    assert shlex.split(ci[0])[1] == "scripts/test.sh" and (ROOT / "scripts" / "test.sh").is_file()


def test_readme_first_command_installs_and_runs_the_demo():
    blocks = [t.content.strip() for t in _tokens(ROOT / "README.md") if t.type == "fence" and t.info == "bash"]
    assert blocks[0] == ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
                         "pip install . && moerun demo")


def test_readme_is_a_five_minute_read():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
