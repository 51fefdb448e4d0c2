"""The CPUs the serving process sizes its sessions' threads by: affinity bounded by the cgroup's quota."""

from __future__ import annotations

import os

import pytest

from plansmith_runtime import cpus
from plansmith_runtime.cpus import available_cpus, quota_cpus
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


def test_available_cpus_is_the_affinity_bounded_by_the_quota(tmp_path, monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus() <= affinity  # this machine's own cgroup files, whatever they say
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpus, "CGROUP_V2_CPU_MAX", cpu_max)
    cpu_max.write_text("100000 100000\n")
    assert available_cpus() == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000} 100000\n")  # a quota above the affinity: the affinity
    assert available_cpus() == affinity
    cpu_max.write_text("not a quota\n")  # unreadable: the affinity, with a warning
    assert available_cpus() == affinity


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
