"""`down` may run days after `up`: it must stop the processes `up` recorded and never signal a
process that merely reuses one of their pids."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from plansmith.devcluster.state import ClusterState, ProcessRecord


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_recorded_process_is_stopped_and_a_recycled_pid_is_left_alone():
    first, second = sleeper(), sleeper()
    try:
        record = ProcessRecord.of("first", first.pid)
        impostor = dataclasses.replace(ProcessRecord.of("second", second.pid), start_ticks=1)  # same pid, other process
        assert record.alive() and not impostor.alive()

        assert impostor.stop(grace=1) is False
        assert second.poll() is None  # untouched

        assert record.stop(grace=5) is False  # SIGTERM was enough
        assert first.wait(timeout=5) != 0 and not record.alive()
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_state_survives_a_round_trip_through_its_file(tmp_path):
    process = sleeper()
    try:
        state = ClusterState(node_ip="192.0.2.2", nodes=["n0"], sysctls={"net.ipv4.ip_forward": "0"})
        state.add("sleeper", process.pid, "/tmp/sleeper.log")
        state.save(tmp_path / "state.json")
        loaded = ClusterState.load(tmp_path / "state.json")
        assert loaded == state and loaded.all_alive()
    finally:
        process.kill()
        process.wait()
    assert not loaded.all_alive()
    assert ClusterState.load(tmp_path / "missing.json") is None
