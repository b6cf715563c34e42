"""The CLI as a newcomer meets it: `--help` summaries whole, convert's options explained, options that would be
ignored refused, and `moerun bench`'s progress shown while it measures."""

from __future__ import annotations

import io
import re

import click
from click.testing import CliRunner
from rich.console import Console

from conftest import run_cli
from moerun.cli import main

# the options `moerun quantize` takes, which `moerun convert` takes with --quantize
QUANT_OPTIONS = ("--block-size", "--scheme", "--method", "--dense", "--fp16", "--accuracy-level")


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _groups(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _groups(command, (*path, name))


def test_help_lists_every_command_with_its_whole_summary():
    for path, group in _groups(main):
        listing = _help(*path).split("Commands:")[1]
        for name, command in group.commands.items():
            line = next(line for line in listing.splitlines() if line.split()[:1] == [name])
            assert "..." not in line, line  # click cuts a summary it finds too long with "..."
            assert line.split(None, 1)[1].strip() == command.get_short_help_str(limit=200), line


def test_convert_help_explains_dtype_and_which_options_need_quantize():
    text = " ".join(_help("convert").split())
    dtype = text.split("--dtype [fp32|fp16]")[1].split("--overwrite")[0]
    assert "Precision of the exported graph" in dtype and "--fp16 is the same" in dtype
    for option in QUANT_OPTIONS:  # "--block-size [0|16|32|64|128] [with --quantize] ...", "--fp16 [with --quantize]"
        assert re.search(rf"{option}( \[[^\]]*\]| INTEGER RANGE)? \[with --quantize\]", text), option
    # `moerun quantize` takes the same options unconditionally
    assert "[with --quantize]" not in _help("quantize")


def test_quantization_options_without_quantize_are_refused_not_ignored(tmp_path):
    for args, refused in ((["--fp16"], "--fp16 only applies"), (["--block-size", "32", "--dense", "int8"],
                                                                  "--block-size, --dense only apply")):
        result = run_cli("convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith(f"Error: {refused} with --quantize"), error
        assert ("use --dtype fp16" in error) == (args == ["--fp16"]), error
        assert not (tmp_path / "out").exists()


def test_bench_display_counts_runs_and_names_the_one_running(monkeypatch):
    """What `moerun bench` shows on a terminal while it measures (CI's stderr is not one: there only the stage
    lines are printed, which tests/test_bench.py checks)."""
    from moerun import console

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120, highlight=False, color_system=None)
    monkeypatch.setattr(console, "err", terminal)
    with console.StageDisplay("preparing", unit="runs") as display:
        display.stage("measure: round 1 of 2")
        display.progress(0, 6, "fp32, batch 1, prompt 16")
        display.progress(3, 6, "int4, batch 4, prompt 16")
        display.bar.refresh()
        shown = screen.getvalue()
    assert "  • measure: round 1 of 2" in shown
    assert "3/6 runs" in shown and "int4, batch 4, prompt 16" in shown
