"""The operator's identity and peering priority (pure functions of plansmith.controller.cli)."""

from __future__ import annotations

from plansmith.controller.cli import operator_identity, peering_priority


def test_identity_is_the_pod_name_when_the_chart_passes_it():
    assert operator_identity({"PLANSMITH_POD_NAME": "plansmith-7d9f-abcde"}, "host", 7) == "plansmith-7d9f-abcde"


def test_identity_without_a_pod_name_needs_no_password_database():
    # a container's UID 10001 has no passwd entry: kopf's default identity (getpass.getuser) crashed there
    assert operator_identity({}, "node-1", 4242) == "node-1/4242"


def test_replicas_get_stable_distinct_priorities():
    pods = [f"plansmith-5c8d7f9b4-{suffix}" for suffix in ("x2k4p", "q9w7z", "m3n8v", "b6c1d")]
    priorities = [peering_priority(pod) for pod in pods]
    assert len(set(priorities)) == len(pods)  # kopf freezes every replica when the top priority is shared
    assert priorities == [peering_priority(pod) for pod in pods]
    assert all(1 <= priority < 1_000_000 for priority in priorities)
