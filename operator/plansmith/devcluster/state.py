"""The dev cluster's state file: what `up` started and changed, so that `down` (in another process,
maybe days later) stops exactly that: processes by pid, checked against their start time so a
recycled pid is never signalled."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), field 22 of /proc/<pid>/stat; None when
    it is gone or a zombie (this machine's init reaps orphans only every few seconds)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int
    log: str = ""

    @classmethod
    def of(cls, name: str, pid: int, log: str = "") -> "ProcessRecord":
        ticks = _start_ticks(pid)
        if ticks is None:
            raise ProcessLookupError(f"{name} (pid {pid}) is not running")
        return cls(name, pid, ticks, log)

    def alive(self) -> bool:
        return _start_ticks(self.pid) == self.start_ticks

    def stop(self, grace: float = 10.0) -> bool:
        """SIGTERM its process group, SIGKILL after `grace` seconds. True when it had to be killed."""
        if not self.alive():
            return False
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            time.sleep(0.1)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        while self.alive() and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        return True


@dataclass
class ClusterState:
    node_ip: str = ""
    api_server: str = ""
    kubeconfig: str = ""
    kubectl: str = ""
    s3_endpoint: str = ""
    nodes: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    created_paths: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    hostport_chains_existed: bool = True
    iptables_chains_before: dict[str, list[str]] = field(default_factory=dict)
    images_source: str = ""  # images.source_digest() of the plansmith images on the nodes
    complete: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, pid: int | None, log: str = "") -> None:
        """Record a started process (one that already exited has nothing left to stop)."""
        if pid is None:
            return
        try:
            self.processes.append(ProcessRecord.of(name, pid, log))
        except ProcessLookupError:
            pass

    def process(self, name: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.name == name), None)

    def all_alive(self) -> bool:
        return bool(self.processes) and all(p.alive() for p in self.processes)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ClusterState | None":
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        raw["processes"] = [ProcessRecord(**p) for p in raw.get("processes", [])]
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)
