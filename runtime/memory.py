"""Peak resident memory of this process."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["human_bytes", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """VmHWM from /proc (reset by exec, so a child's own peak); ru_maxrss where /proc is missing.

    ru_maxrss survives fork+exec on Linux: a process started by a large parent reports the parent's
    peak, which is why it is only the fallback.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (binary units, up to GB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
