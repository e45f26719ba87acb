"""One line naming the machine a benchmark ran on, for its printed output and JSON."""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """CPU model (from /proc/cpuinfo where there is one), usable cores, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, torch {torch.__version__}"
