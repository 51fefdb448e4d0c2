"""How many CPUs this process may use: its CPU affinity, bounded by its cgroup's CPU quota (a pod's
CPU limit).

os.cpu_count() counts the node's cores. In a pod limited to 2 CPUs on a 64-core node, ONNX Runtime's
default of a thread per core would run 64 threads on 2 CPUs' worth of quota, and the kernel's CFS
bandwidth control would stall them all for the rest of every period once the quota is spent.
(Python 3.13's os.process_cpu_count() reads the affinity only, not the quota.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def quota_cpus(cpu_max: str | None = None, cfs_quota_us: str | None = None, cfs_period_us: str | None = None) -> int | None:
    """The whole CPUs a cgroup CPU quota allows (at least 1), from cgroup v2's `cpu.max` ("max 100000"
    or "200000 100000") or cgroup v1's cfs_quota_us / cfs_period_us (-1: no quota); None without a
    quota. A fraction of a CPU is rounded down: a thread more than the quota pays for is throttled.
    Raises ValueError on text that is neither."""
    if cpu_max is not None:
        quota, _, period = cpu_max.strip().partition(" ")
        if quota == "max":
            return None
        return max(1, int(quota) // int(period or "100000"))
    if cfs_quota_us is not None and cfs_period_us is not None:
        quota_us = int(cfs_quota_us)
        return None if quota_us <= 0 else max(1, quota_us // int(cfs_period_us))
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), bounded by its cgroup's CPU quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        limit = quota_cpus(_read(CGROUP_V2_CPU_MAX), _read(CGROUP_V1_QUOTA), _read(CGROUP_V1_PERIOD))
    except ValueError as error:
        log.warning("cannot read this process's CPU quota (%s): using its %d CPUs", error, affinity)
        return affinity
    return min(affinity, limit) if limit is not None else affinity
