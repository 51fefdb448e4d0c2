"""The operator as a local process (`plansmith operator`), for tests and benchmarks against a real
API server: started, killed (as a crash would) and stopped (as a rollout would), its output in a log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class OperatorProcess:
    def __init__(self, namespace: str, log: Path, env: dict[str, str], *, verbose: bool = False):
        """`env` is added to this process's environment: KUBECONFIG and the PLANSMITH_* settings."""
        self.namespace, self.log, self.env, self.verbose = namespace, log, env, verbose
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, **extra_env: str) -> "OperatorProcess":
        command = [sys.executable, "-m", "plansmith.cli", "operator", "--namespace", self.namespace]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command + (["--verbose"] if self.verbose else []), stdout=out,
                                            stderr=subprocess.STDOUT, env={**os.environ, **self.env, **extra_env})
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, as Kubernetes sends it; SIGKILL after 20 s."""
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
