"""This process's memory: the resident set now, its peak, and resetting the peak (Linux ``/proc``).

The peak is the kernel's ``VmHWM``, not ``resource.getrusage().ru_maxrss``: a child started by fork + exec keeps its
parent's ``ru_maxrss``, so a worker spawned by a large parent would report the parent's peak. Where ``/proc`` is
missing (macOS) the peak falls back to ``ru_maxrss``; with neither (Windows) the functions raise ``OSError``.

The one-process labelling command writes the peak into ``summary.json`` (``peak_rss_mb``: how much memory one
worker needs; the command is taught in ``notebooks/13_label_dataset.ipynb``); ``benchmarks/benchmark.py`` and
``scripts/soak.py`` measure with it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["peak_rss_bytes", "reset_peak_rss", "rss_bytes"]

_STATUS = Path("/proc/self/status")


def rss_bytes() -> int:
    """The resident set size of this process now."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: the peak is the best figure the standard library has
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The peak resident set size of this process (since :func:`reset_peak_rss`, where that worked)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource  # Unix only
    except ImportError:
        raise OSError("This system has neither /proc nor the resource module: no peak memory figure.") from None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # may include the parent's peak (see above)
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux kB


def reset_peak_rss() -> bool:
    """Start a new peak at the current size (Linux ``clear_refs``); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
