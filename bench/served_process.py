"""A KServe v2 server process the serving benchmark drives (plansmith's, or the Triton reference):
its ports, readiness, the counters of its Prometheus metrics, and a SIGTERM to stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path


class ServedProcess:
    stop_timeout = 30.0  # seconds between SIGTERM and SIGKILL

    http: int
    grpc: int
    metrics: int

    def launch(self, command: list[str], log_path: Path, ready_timeout: float) -> bool:
        """Start `command` (listening on self.http/grpc/metrics) and wait until /v2/health/ready
        answers 200 and the metrics endpoint answers (Triton starts it after the model is ready);
        False (and stopped) when it exits or is not ready in time."""
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        waiting_for = [f"http://127.0.0.1:{self.http}/v2/health/ready", f"http://127.0.0.1:{self.metrics}/metrics"]
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(waiting_for[0], timeout=1) as response:
                    if response.status == 200:
                        waiting_for.pop(0)
                        if not waiting_for:
                            return True
            except OSError:
                time.sleep(0.1)
        self.stop()
        return False

    def counters(self) -> dict[str, float]:
        """The nv_inference_* counters of its Prometheus metrics (Triton's names, served by both)."""
        return {name: float(value) for name, value in re.findall(r"^(nv_inference_\w+)\{[^}]*\} (\S+)$",
                                                                 self._metrics_text(), re.M)}

    def gpu_metrics(self) -> dict[str, dict[str, float]]:
        """Triton's per-GPU metrics (nv_gpu_*, nv_energy_consumption) by gpu_uuid, as last polled."""
        readings: dict[str, dict[str, float]] = {}
        for name, uuid, value in re.findall(r'^(nv_gpu_\w+|nv_energy_consumption)\{gpu_uuid="([^"]+)"\} (\S+)$',
                                            self._metrics_text(), re.M):
            readings.setdefault(uuid, {})[name] = float(value)
        return readings

    def cpu_seconds(self) -> float:
        """CPU time (user and system, every thread) of the server and its live descendants (Triton's
        Python backend runs each model instance in a stub process of its own)."""
        return sum(process_cpu_seconds(pid) for pid in process_tree(self.process.pid))

    def _metrics_text(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics").read().decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(root: int) -> list[int]:
    """`root` and every live process descending from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def counted(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """How much a counter of ServedProcess.counters() rose between two readings."""
    return after.get(name, 0.0) - before.get(name, 0.0)


def mean_batch(before: dict[str, float], after: dict[str, float]) -> float:
    """Items per execution between two readings (nv_inference_count over nv_inference_exec_count)."""
    executions = counted(before, after, "nv_inference_exec_count")
    return counted(before, after, "nv_inference_count") / executions if executions else float("nan")


def server_time_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """A request's mean time inside the server between two readings (Triton's
    nv_inference_request_duration_us: from receiving the request to sending the response)."""
    served = counted(before, after, "nv_inference_request_success")
    return counted(before, after, "nv_inference_request_duration_us") / served / 1000 if served else None
