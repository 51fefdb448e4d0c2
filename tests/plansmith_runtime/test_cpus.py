"""The CPUs the serving process sizes its sessions' threads by: affinity bounded by the cgroup's quota."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plansmith_runtime.cpus import available_cpus, cgroup_cpu_limit, quota_cpus
from plansmith_runtime.model import intra_op_threads


@pytest.mark.parametrize("cpu_max, quota_us, period_us, expected", [
    ("max 100000\n", None, None, None),  # cgroup v2, no limit
    ("200000 100000\n", None, None, 2),  # a pod limited to 2 CPUs
    ("150000 100000\n", None, None, 1),  # 1.5 CPUs: a second thread would be throttled
    ("50000 100000\n", None, None, 1),  # half a CPU: still one thread
    (None, "-1\n", "100000\n", None),  # cgroup v1, no limit
    (None, "400000\n", "100000\n", 4),
    (None, None, None, None),  # no cgroup files
], ids=["v2-max", "v2-2", "v2-1.5", "v2-0.5", "v1-unlimited", "v1-4", "none"])
def test_quota_cpus_reads_cgroup_v2_and_v1(cpu_max, quota_us, period_us, expected):
    assert quota_cpus(cpu_max, quota_us, period_us) == expected


def cgroup_tree(root: Path, quotas: dict[str, str], name: str) -> None:
    """Directories under `root` with a quota file `name` holding each text of `quotas` (path -> text)."""
    for path, text in quotas.items():
        directory = root / path
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def test_the_tightest_quota_on_the_cgroup_or_an_ancestor_counts_cgroup_v2(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    cgroup_tree(tmp_path, {"kubepods/pod1": "300000 100000\n", "kubepods/pod1/app": "max 100000\n"}, "cpu.max")
    assert cgroup_cpu_limit("0::/kubepods/pod1/app\n", tmp_path) == 3  # the pod's limit, set on the parent
    (tmp_path / "kubepods/pod1/app/cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_limit("0::/kubepods/pod1/app\n", tmp_path) == 2
    # in a container the mount is the container's own cgroup: the host's path is not under it
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_limit("0::/kubepods/pod2/other\n", tmp_path) == 1
    assert cgroup_cpu_limit("0::/\n", tmp_path / "kubepods") is None  # no cgroup.controllers: not v2 here


def test_the_tightest_quota_on_the_cgroup_or_an_ancestor_counts_cgroup_v1(tmp_path):
    cgroup_tree(tmp_path / "cpu", {"": "-1\n", "kubepods": "400000\n", "kubepods/app": "-1\n"}, "cpu.cfs_quota_us")
    cgroup_tree(tmp_path / "cpu", {"": "100000\n", "kubepods": "100000\n", "kubepods/app": "100000\n"},
                "cpu.cfs_period_us")
    text = "5:memory:/kubepods/app\n4:cpu,cpuacct:/kubepods/app\n0::/\n"
    assert cgroup_cpu_limit(text, tmp_path) == 4
    assert cgroup_cpu_limit("4:cpu,cpuacct:/\n", tmp_path) is None
    (tmp_path / "cpu/kubepods/app/cpu.cfs_quota_us").write_text("not a number\n")
    with pytest.raises(ValueError):
        cgroup_cpu_limit(text, tmp_path)


CPU_CGROUP_V1 = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(os.geteuid() != 0 or not (CPU_CGROUP_V1 / "cpu.cfs_quota_us").exists(),
                    reason="creates a cgroup v1 cpu group, which needs root and the v1 cpu controller")
def test_a_process_in_a_cgroup_with_a_one_cpu_quota_sizes_for_one_cpu(tmp_path):
    """A real cgroup: the kernel's own files and /proc/self/cgroup, as a pod's process sees them."""
    group = CPU_CGROUP_V1 / f"plansmith-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        probe = "from plansmith_runtime.cpus import available_cpus; print(available_cpus())"
        joined = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable, probe],
                                capture_output=True, text=True, timeout=60, check=True)
        outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    finally:
        group.rmdir()
    assert joined.stdout.strip() == "1"
    assert outside.stdout.strip() == str(len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("requested, instances, process_cpus, machine_cpus, expected", [
    (3, 1, 2, 64, 3),  # asked for
    (0, 1, 64, 64, 0),  # every core of the machine: the backend's default
    (0, 1, 2, 64, 2),  # a pod limited to 2 of 64 cores: 2, not ONNX Runtime's 64
    (0, 2, 2, 2, 1),  # one single-threaded instance per core
    (0, 4, 8, 64, 2),  # the pod's CPUs shared between the instances
    (0, 4, 2, 64, 1),  # at least one
], ids=["asked", "whole-machine", "pod-limit", "instance-per-core", "shared", "at-least-one"])
def test_intra_op_threads_share_the_cpus_the_process_may_use(requested, instances, process_cpus, machine_cpus, expected):
    assert intra_op_threads(requested, instances, process_cpus, machine_cpus) == expected
