"""The CPUs this process may run on (its affinity mask where the platform has one, else the CPU count)."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """How many CPUs this process may run on (at least 1): the default size of thread and process pools."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
