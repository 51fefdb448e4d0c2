"""How many CPUs this process may use: its CPU affinity, bounded by its cgroup's CPU quota (a pod's
CPU limit).

os.cpu_count() counts the node's cores. In a pod limited to 2 CPUs on a 64-core node, ONNX Runtime's
default of a thread per core would run 64 threads on 2 CPUs' worth of quota, and the kernel's CFS
bandwidth control would stall them all for the rest of every period once the quota is spent.
Python 3.13's os.process_cpu_count() reads the affinity only, not the quota, and no library on this
project's list reads cgroup quotas (Go's automaxprocs is the usual reference): this reads the
process's cgroups from /proc/self/cgroup and the quota files of them and their ancestors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


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


def _up_to(mount: Path, cgroup: str) -> list[Path]:
    """A cgroup's directory under its hierarchy's mount and every ancestor up to the mount (a quota
    set on any of them applies). In a container the mount is the container's own cgroup and the
    path, the host's, is not under it: then the mount alone."""
    directory = mount / cgroup.lstrip("/")
    if not directory.is_dir():
        return [mount]
    return [directory, *[parent for parent in directory.parents if parent.is_relative_to(mount)]]


def cgroup_cpu_limit(proc_self_cgroup: str, root: Path = CGROUP_ROOT) -> int | None:
    """The tightest CPU quota, in whole CPUs, on the cgroups a process is in (`proc_self_cgroup`: the
    text of /proc/self/cgroup) and their ancestors: cgroup v1's cpu controller mounted at root/cpu,
    or cgroup v2 at root. None without a quota. Raises ValueError on a quota file it cannot read."""
    limits = []
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if hierarchy == "0" and controllers == "" and (root / "cgroup.controllers").exists():  # cgroup v2
            limits += [quota_cpus(cpu_max=_read(directory / "cpu.max")) for directory in _up_to(root, cgroup)]
        elif "cpu" in controllers.split(",") and (root / "cpu").is_dir():  # cgroup v1
            limits += [quota_cpus(cfs_quota_us=_read(directory / "cpu.cfs_quota_us"),
                                  cfs_period_us=_read(directory / "cpu.cfs_period_us"))
                       for directory in _up_to(root / "cpu", cgroup)]
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), bounded by its cgroups' CPU quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        limit = cgroup_cpu_limit(_read(Path("/proc/self/cgroup")) or "")
    except ValueError as error:
        log.warning("cannot read this process's CPU quota (%s): using its %d CPUs", error, affinity)
        return affinity
    return min(affinity, limit) if limit is not None else affinity
