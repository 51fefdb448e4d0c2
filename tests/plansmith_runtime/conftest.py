"""Engines built by the real builder, and `plansmith serve` processes on free loopback ports."""

from __future__ import annotations

import ctypes
import enum
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from plansmith.devcluster.processes import free_port
from plansmith.manifest import parse_manifest
from plansmith_runtime.cuda_shared_memory import CUDA_IPC_HANDLE_SIZE

PLANSMITH = str(Path(sys.executable).with_name("plansmith"))



class StandInCudaRuntime:
    """The cuda-python runtime calls the CUDA shared memory registry and the executors' device
    batches make, answered as cuda.bindings.runtime answers them ((error, value) tuples), over host
    memory: "device memory" (a client's allocation named by its IPC handle's bytes, or a cudaMalloc)
    is host buffers, so what is copied where is visible. It stands in for cuda.bindings.driver's
    cuMemGetAddressRange too."""

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801  (cuda-python's names)
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    cudaIpcMemLazyEnablePeerAccess = 1
    cudaStreamNonBlocking = 1

    class cudaIpcMemHandle_t:  # noqa: N801
        def __init__(self) -> None:
            self._bytes = ctypes.create_string_buffer(CUDA_IPC_HANDLE_SIZE)

        def getPtr(self) -> int:  # noqa: N802
            return ctypes.addressof(self._bytes)

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.allocations: dict[bytes, ctypes.Array] = {}  # handle bytes -> the client's "device memory"
        self.opened: dict[int, bytes] = {}  # mapped address -> handle
        self.device_memory: dict[int, ctypes.Array] = {}  # cudaMalloc'd address -> its buffer
        self.streams: list[str] = []  # streams created and not destroyed
        self.current_device = 0
        # (direction, bytes, the device current then): every cudaMemcpy, cudaMemcpyAsync and cudaMemsetAsync
        self.copies: list[tuple[str, int, int]] = []
        self.synchronized = 0  # cudaStreamSynchronize calls

    def allocate(self, nbytes: int, tag: int) -> bytes:
        """A client's allocation and the raw IPC handle it would send."""
        handle = bytes([tag]) * CUDA_IPC_HANDLE_SIZE
        self.allocations[handle] = ctypes.create_string_buffer(nbytes)
        return handle

    def memory(self, handle: bytes) -> np.ndarray:
        buffer = self.allocations[handle]
        return np.frombuffer(buffer, np.uint8, len(buffer))

    def cudaSetDevice(self, device: int):  # noqa: N802
        if not 0 <= device < self.devices:
            return (101,)  # cudaErrorInvalidDevice
        self.current_device = device
        return (0,)

    def cudaIpcOpenMemHandle(self, handle, flags):  # noqa: N802
        raw = ctypes.string_at(handle.getPtr(), CUDA_IPC_HANDLE_SIZE)
        if raw not in self.allocations or flags != self.cudaIpcMemLazyEnablePeerAccess:
            return (400, None)  # cudaErrorInvalidResourceHandle
        address = ctypes.addressof(self.allocations[raw])
        self.opened[address] = raw
        return (0, address)

    CUdeviceptr = int  # noqa: N815  (cuda.bindings.driver's)

    def cuMemGetAddressRange(self, pointer: int):  # noqa: N802
        """(error, base, size) of the allocation `pointer` lies in."""
        for buffer in (*self.allocations.values(), *self.device_memory.values()):
            base = ctypes.addressof(buffer)
            if base <= pointer < base + len(buffer):
                return (0, base, len(buffer))
        return (1, 0, 0)  # CUDA_ERROR_INVALID_VALUE

    def cudaIpcCloseMemHandle(self, pointer: int):  # noqa: N802
        return (0,) if self.opened.pop(pointer, None) is not None else (400,)

    def cudaMemcpy(self, destination: int, source: int, nbytes: int, kind):  # noqa: N802
        self.copies.append((kind.name, nbytes, self.current_device))
        ctypes.memmove(destination, source, nbytes)
        return (0,)

    def cudaMalloc(self, nbytes: int):  # noqa: N802
        buffer = ctypes.create_string_buffer(nbytes)
        ctypes.memset(buffer, 0xAB, nbytes)  # as uninitialized memory holds anything, not zeros
        self.device_memory[ctypes.addressof(buffer)] = buffer
        return (0, ctypes.addressof(buffer))

    def cudaFree(self, pointer: int):  # noqa: N802
        return (0,) if self.device_memory.pop(pointer, None) is not None else (1,)  # cudaErrorInvalidValue

    def cudaStreamCreateWithFlags(self, flags: int):  # noqa: N802
        self.streams.append(f"stream-{len(self.streams)}")
        return (0, self.streams[-1])

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams.remove(stream)
        return (0,)

    def cudaMemcpyAsync(self, destination: int, source: int, nbytes: int, kind, stream):  # noqa: N802
        assert stream in self.streams
        return self.cudaMemcpy(destination, source, nbytes, kind)

    def cudaMemsetAsync(self, pointer: int, value: int, nbytes: int, stream):  # noqa: N802
        assert stream in self.streams
        self.copies.append(("cudaMemsetAsync", nbytes, self.current_device))
        ctypes.memset(pointer, value, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert stream in self.streams
        self.synchronized += 1
        return (0,)


@pytest.fixture
def stand_in_cuda():
    """Makes StandInCudaRuntimes: stand_in_cuda(devices=2)."""
    return StandInCudaRuntime


@dataclass
class BuiltEngine:
    model: object  # plansmith.testmodels.TestModel
    manifest_uri: str
    engine_path: Path  # the engine artifact in the file:// store

    @property
    def execution_provider(self) -> str | None:
        """The provider the builder built the engine for: the CPU's here, CUDA's where it found a GPU."""
        return parse_manifest(Path(self.manifest_uri.removeprefix("file://")).read_bytes()).target.execution_provider

    def session(self):
        """A session of the engine on the execution provider it was built for (on CUDA's, whose
        optimized graph the CPU provider may not run, where the builder found a GPU)."""
        import onnxruntime as ort

        from plansmith_runtime.executors.onnxruntime import providers_for

        return ort.InferenceSession(str(self.engine_path), providers=providers_for(self.execution_provider))


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
        manifest_path = Path(uri.removeprefix("file://"))
        engine_name = parse_manifest(manifest_path.read_bytes()).artifact("engine").name
        built[kind] = BuiltEngine(info, uri, manifest_path.parent / engine_name)
    return built


# How close a served output must be to the same engine run directly on the same input. On the CPU a
# request's rows come out of a batch as they would alone. ONNX Runtime's CUDA provider picks
# convolution algorithms (TF32 among them, its default as Triton's) per batch size, which moves a
# request's logits by up to ~2e-3 when it runs batched (an H200); another request's image would
# move them by about 1.
ON_THE_CPU = dict(rtol=1e-5, atol=1e-5)
BATCHED_ON_A_GPU = dict(rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="session")
def tolerance(engines) -> dict[str, float]:
    """ON_THE_CPU, or BATCHED_ON_A_GPU where the builder found a GPU and built for it."""
    from plansmith.onnxruntime_providers import CPU_PROVIDER

    on_a_gpu = any(built.execution_provider not in (None, CPU_PROVIDER) for built in engines.values())
    return BATCHED_ON_A_GPU if on_a_gpu else ON_THE_CPU


@pytest.fixture
def cpu_engines(engines) -> dict[str, BuiltEngine]:
    """`engines`, for the tests that play device memory with the stand-in CUDA runtime's host
    memory: skipped where the builder found a GPU, whose sessions would take those host addresses
    for device memory (test_server.py's GPU tests cover that machine)."""
    from plansmith.onnxruntime_providers import CPU_PROVIDER

    if any(built.execution_provider not in (None, CPU_PROVIDER) for built in engines.values()):
        pytest.skip("plays device memory with host memory: needs engines built for the CPU")
    return engines


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

