"""Engines built by the real builder, and `plansmith serve` processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from plansmith.devcluster.processes import free_port

PLANSMITH = str(Path(sys.executable).with_name("plansmith"))


@dataclass
class BuiltEngine:
    model: object  # plansmith.testmodels.TestModel
    manifest_uri: str
    engine_path: Path  # the engine artifact in the file:// store

    def session(self):
        """A session of the engine on the execution provider it was built for (the CPU's here; CUDA's
        where the builder found a GPU, whose optimized graph the CPU provider may not run)."""
        import onnxruntime as ort

        from plansmith.manifest import parse_manifest
        from plansmith_runtime.executors.onnxruntime import providers_for

        manifest = parse_manifest(Path(self.manifest_uri.removeprefix("file://")).read_bytes())
        return ort.InferenceSession(str(self.engine_path), providers=providers_for(manifest.target.execution_provider))


def build_engine(kind: str, workdir: Path, storage_uri: str, endpoint: str | None = None) -> tuple[object, str]:
    """Generate a test model and build its engine with the real builder; (TestModel, manifest URI)."""
    from plansmith import testmodels
    from plansmith.validation import parse_spec
    from plansmith_builder.build import BuildRequest, run_build

    info = getattr(testmodels, kind)(workdir / f"{kind}.onnx")
    spec = parse_spec({"model": {"uri": f"file://{info.path}", "inputs": info.spec_inputs()},
                       "build": {"backend": "onnxruntime", "precision": "fp32"},
                       "storage": {"uri": storage_uri, **({"endpoint": endpoint} if endpoint else {})}})
    result = run_build(BuildRequest(spec=spec, workdir=workdir / f"build-{kind}"))
    assert result.status in ("built", "hit"), result.to_json()
    return info, result.manifest_uri


@pytest.fixture(scope="session")
def engines(tmp_path_factory) -> dict[str, BuiltEngine]:
    workdir = tmp_path_factory.mktemp("engines")
    store = workdir / "store"
    built = {}
    for kind in ("mlp", "small_cnn"):
        info, uri = build_engine(kind, workdir, f"file://{store}")
        folder = Path(uri.removeprefix("file://")).parent
        built[kind] = BuiltEngine(info, uri, folder / "model.onnx")
    return built


class ServerProcess:
    """`plansmith serve` in its own process; stopped by SIGTERM to its pid."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None) -> None:
        self.args, self.log_path, self.env = args, log_path, {**os.environ, **(env or {})}
        self.launches = 0
        self._launch()

    def _launch(self) -> None:
        self.launches += 1
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        command = [PLANSMITH, "serve", *self.args, "--host", "127.0.0.1", "--http-port", str(self.http_port),
                   "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.http_port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metrics(self) -> dict[str, float]:
        _, body = self.get("/metrics", self.metrics_port)
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def wait_live(self, timeout: float = 60) -> None:
        self._wait(lambda: self.get("/v2/health/live")[0] == 200, timeout, "live")

    def wait_ready(self, timeout: float = 60) -> "ServerProcess":
        self._wait(lambda: self.get("/v2/health/ready")[0] == 200, timeout, "ready")
        return self

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "cannot listen" in self.log() and self.launches < 3:
                    # another process on this shared machine took a "free" port first: new ports
                    self._log.close()
                    self._launch()
                    continue
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not {what} after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_server(tmp_path):
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(list(args), tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.terminate()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """A module-scoped server factory (servers shared by the tests of one module)."""
    started: list[ServerProcess] = []
    workdir = tmp_path_factory.mktemp("servers")

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(list(args), workdir / f"server-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.terminate()

