"""Resident memory of this process, for benchmarks that measure what one run adds (Linux /proc).

``ru_maxrss`` cannot be used for a run's peak: a child inherits its parent's high-water mark across
fork+exec. Instead reset the high-water mark (VmHWM) just before the run and read it after.
"""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure_growth(run) -> tuple[int, object]:
    """Peak resident set during ``run()`` minus the resident set just before it, and what it returned."""
    before = status_bytes("VmRSS")
    reset_peak()
    result = run()
    return status_bytes("VmHWM") - before, result


__all__ = ["measure_growth", "reset_peak", "status_bytes"]
