"""What the `moerun` commands show on the terminal: rich consoles, stage lines, sizes and summary tables.

Shared by cli.py and demo.py (neither imports the other's helpers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .runtime.memory import human_bytes as human_size

__all__ = ["StageDisplay", "err", "human_size", "inspection_table", "out", "quiet_converter_libraries", "run_convert",
           "stages", "summary_table"]


def _console(stderr: bool = False) -> Console:
    """Rich wraps at the terminal's width, and at 80 columns in a pipe or a file, where it would break
    messages and paths mid-phrase: so output that is not a terminal is never wrapped."""
    console = Console(stderr=stderr, highlight=False)
    console.soft_wrap = not console.is_terminal
    return console


err = _console(stderr=True)
out = _console()


def summary_table(rows: list[tuple[str, str]], title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


def quiet_converter_libraries() -> None:
    """Imports the converter (and torch), then silences their loggers: torch resets its loggers' levels on
    import, and the exporter logs a lot that users cannot act on."""
    from transformers.utils import logging as hf_logging

    from .converter import convert  # noqa: F401

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def stages(first: str) -> Iterator[Callable[[str], None]]:
    """A live status line on stderr; yields ``on_stage(name)``, which shows a stage and lists it."""
    with StageDisplay(first) as display:
        yield display.stage


class StageDisplay:
    """Stage lines on stderr, a spinner between them, and during a long stage a bar: bytes written, throughput
    and time left (``unit="bytes"``, convert) or runs done of all and the one running (any other unit: bench).
    Rich shows neither spinner nor bar when stderr is not a terminal; the stage lines are printed anyway."""

    def __init__(self, first: str, unit: str = "bytes") -> None:
        self.status = err.status(first)
        self.unit = unit
        self.bar = None

    def stage(self, name: str) -> None:
        self._end_bar()
        self.status.update(f"[bold]{name}[/bold]")
        err.print(f"  • {name}")

    def progress(self, done: int, total: int, running: str = "") -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if not err.is_terminal:
            return
        if self.bar is None:
            self.status.stop()
            counts = ((DownloadColumn(), TransferSpeedColumn()) if self.unit == "bytes"
                      else (MofNCompleteColumn(), TextColumn(self.unit)))
            self.bar = Progress(TextColumn("    "), BarColumn(), *counts, TimeRemainingColumn(),
                                TextColumn("{task.description}"), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done, description=running)

    def _end_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
            self.status.start()

    def __enter__(self) -> StageDisplay:
        self.status.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.status.stop()


def run_convert(source: Path, output: Path, **options):
    """convert() with a live status line per stage and a progress bar while the weights are written."""
    from .converter.convert import convert

    quiet_converter_libraries()
    with StageDisplay("checking the checkpoint") as display:
        return convert(source, output, on_stage=display.stage, on_progress=display.progress, **options)


def _dims(tensors) -> str:
    return "; ".join(f"{t.name} {t.dtype}[{', '.join(map(str, t.dims))}]" for t in tensors)


def inspection_table(report) -> Table:
    """`moerun inspect`: a deploy.inspect.Inspection as one table."""
    rows = [("model", f"{report.architecture} ({report.kind}), {report.dtype}, {human_size(report.total_bytes)}"),
            ("attention", report.attention), ("experts", report.quantization)]
    for g in report.graphs:
        past = [t for t in g.inputs if t.name.startswith("past")]
        shown = [t for t in g.inputs if not t.name.startswith("past")] + past[:2]
        more = f"; ... {len(past) - 2} more past inputs" if len(past) > 2 else ""
        rows.append((f"{g.file}", f"{human_size(g.bytes)}, IR {g.ir_version}, opsets "
                     + ", ".join(f"{d} {v}" for d, v in g.opsets.items())))
        rows.append(("  inputs", _dims(shown) + more))
        outputs = [t for t in g.outputs if not t.name.startswith("present")]
        rows.append(("  outputs", _dims(outputs) + f"; {len(g.outputs) - len(outputs)} present outputs"))
        for domain, ops in g.ops.items():
            rows.append((f"  ops {domain}", ", ".join(f"{op} {n}" for op, n in ops.items())))
        for node in g.moe_nodes[:1]:
            bits = f", int{node.bits} block {node.block_size}" if node.bits else ""
            rows.append((f"  {node.op_type} x{len(g.moe_nodes)}",
                         f"{node.experts} experts, top-{node.k}, {node.activation}{bits} (first: {node.name})"))
    rows.append(("min ONNX Runtime", f"{report.min_onnxruntime} ({'; '.join(report.min_onnxruntime_basis)})"))
    rows += [(f"EP {ep}", verdict) for ep, verdict in report.execution_providers.items()]
    rows += [(f"deploy {target}", verdict) for target, verdict in report.deploy_targets.items()]
    rows.append(("--strict", "passes" if report.strict_ok else f"fails: {', '.join(report.foreign_ops)}"))
    rows += [("note", note) for note in report.notes]
    return summary_table(rows, f"moerun inspect {report.model_dir}")
