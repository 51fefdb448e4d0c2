"""Serving benchmark: `plansmith serve` under load, batching on vs off, against the in-process ceiling.

    .venv/bin/python bench/serve.py [--duration 4] [--concurrency 1,8,64] [--models mlp,small_cnn,cnn224] [--no-http]
                                    [--triton-reference]

For each generated model (an MLP 256-512-10 whose compute is tens of microseconds; the test CNN on
32x32 images, about 60 us an image, so the request path still dominates; and the same CNN on 224x224
images, about 3 ms an image, compute-dominated) the engine is built with the real builder, then
served twice, batching on and off, and driven at each concurrency by
  - gRPC: asyncio generators (grpc.aio, calling GRPCInferenceService/ModelInfer with a request
    built once from tritonclient's service_pb2, raw_input_contents) spread over processes;
  - HTTP: `wrk` (Debian package) with a Lua script posting a binary-tensor infer request.
It prints throughput, p50/p95/p99 and the ratios the targets are stated in:
  MLP: batching on / off throughput at c=64 (target >= 5x, with lower p99), and its bound: the rate at
    which the server answers the same request for an unknown model (404: parsed, routed and answered
    over the same connections, no tensor work), about the most an infer request could reach;
  CNNs: served items/s at c=64 / in-process ceiling (direct ONNX Runtime at its best batch size, one
    session on every core or one single-threaded session per core, whichever is faster; target >= 80%),
    in the default layout (one instance, ONNX Runtime's threads, maxBatchSize 32) and, for the models
    named by --throughput-layout (the compute-bound 224x224 CNN), also at c=64 in the throughput layout:
    the ceiling's own way of running (its sessions as the instances, its best batch size as maxBatchSize);
  c=1: gRPC p50 minus a direct session.run p50 on the same input, batching on and off (target <= 1 ms);
    also with the input and output in system shared memory (Triton's extension, for a client on the
    same host), the input written and the output read back on every call.
With --triton-reference each engine is also served by a real Triton server (bench/triton_reference.py:
the tritonserver in nvidia-pytriton's wheel, Python backend wrapping the same ONNX Runtime session, same
batching settings; fetched once with pip) under the same generators, and every row is compared.
Every row also shows where the CPU went while it was measured (the server's cores and CPU a
request, the load generator's cores, idle cores; the 404 row's errors are its 404s). Everything
runs on this machine at once (server, generators, ceiling), side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plansmith.devcluster.processes import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served_process import CLOCK_TICKS, ServedProcess, mean_batch, server_time_ms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANSMITH = str(Path(sys.executable).with_name("plansmith"))
MAX_BATCH = 32
QUEUE_DELAY_US = 100


@dataclass(frozen=True)
class Layout:
    """How an engine is served: the batch limit and the executors. plansmith and the Triton reference
    get the same one."""

    name: str
    max_batch_size: int = MAX_BATCH
    instances: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default, one thread per core in each session

    def plansmith_args(self) -> list[str]:
        args = ["--max-batch-size", str(self.max_batch_size), "--instances", str(self.instances)]
        return args + (["--intra-op-threads", str(self.intra_op_threads)] if self.intra_op_threads else [])

    def describe(self) -> str:
        threads = f"{self.intra_op_threads}-threaded" if self.intra_op_threads else "ONNX Runtime's threads"
        return f"{self.instances} instance(s), {threads}, maxBatchSize {self.max_batch_size}"


DEFAULT_LAYOUT = Layout("default")


def throughput_layout(direct: dict) -> Layout:
    """A compute-bound model served the way its in-process ceiling ran fastest: the same sessions
    (one on every core, or one single-threaded session per core) and its best batch size as the
    largest batch. On this CPU the 224x224 CNN computes an item no faster at batch 32 than at batch 1,
    and with one single-threaded instance per core a preempted thread stalls one batch, not both
    cores' share of it (docs/benchmarks.md)."""
    return Layout("throughput", max_batch_size=direct["ceiling_batch"], instances=direct["ceiling_sessions"],
                  intra_op_threads=direct["ceiling_threads"])


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "{header_length}"
local f = io.open("{body_path}", "rb")
wrk.body = f:read("*all")
f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def load_figures(latencies: list[float], duration: float, errors: int = 0) -> dict:
    """Throughput and p50/p95/p99 (ms) of the calls a generator timed over `duration` seconds."""
    p50, p95, p99 = percentiles(latencies)
    return {"rps": len(latencies) / duration, "p50": p50, "p95": p95, "p99": p99, "errors": errors}


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if not latencies:
        return float("nan"), float("nan"), float("nan")
    array = np.asarray(latencies) * 1000
    return tuple(float(np.percentile(array, q)) for q in (50, 95, 99))  # type: ignore[return-value]


# --------------------------------------------------------------------------- server


class Server(ServedProcess):
    """`plansmith serve` on free ports."""

    def __init__(self, manifest_uri: str, batching: bool, log_path: Path, extra: list[str],
                 layout: Layout = DEFAULT_LAYOUT) -> None:
        for attempt in range(3):  # free ports can be taken by another process before the server binds them
            self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
            args = [PLANSMITH, "serve", "--manifest", manifest_uri, "--host", "127.0.0.1", "--http-port", str(self.http),
                    "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *layout.plansmith_args(),
                    "--max-queue-delay-us", str(QUEUE_DELAY_US), "--max-queue-size", "4096", "--log-level", "WARNING"]
            if not batching:
                args.append("--no-batching")
            if self.launch(args + extra, log_path, ready_timeout=60):
                return
        raise RuntimeError(f"server did not become ready: {log_path.read_text()}")


# --------------------------------------------------------------------------- gRPC generator


def model_infer_call(channel):
    """The method tritonclient.grpc.service_pb2_grpc.GRPCInferenceServiceStub.ModelInfer calls,
    taking a request serialized beforehand."""
    from tritonclient.grpc import service_pb2

    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda body: body,
                               response_deserializer=service_pb2.ModelInferResponse.FromString)


async def back_to_back(one_call, duration: float) -> list[float]:
    """Latencies of `one_call()` awaited one after another for `duration` seconds, after one untimed
    call that connects."""
    await one_call()
    latencies = []
    stop_at = time.perf_counter() + duration
    while time.perf_counter() < stop_at:
        begin = time.perf_counter()
        await one_call()
        latencies.append(time.perf_counter() - begin)
    return latencies


def _grpc_worker(url: str, model_name: str, input_name: str, array: np.ndarray, concurrency: int,
                 duration: float, start_at: float, results) -> None:
    """One generator process: `concurrency` coroutines calling ModelInfer back to back through
    tritonclient's GRPCInferenceService stub on one channel. The request is serialized once (as a
    client with a fixed input would), so the generator spends its CPU on the calls, not on
    rebuilding the same message."""
    import grpc
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    payload = request.SerializeToString()

    async def main():
        channel = grpc.aio.insecure_channel(url)
        call = model_infer_call(channel)
        latencies: list[float] = []
        errors = 0
        first = await call(payload)  # connect (and check the answer) before the clock starts
        assert first.raw_output_contents, "the server returned no outputs"
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        stop_at = start_at + duration

        async def loop():
            nonlocal errors
            while time.time() < stop_at:
                begin = time.perf_counter()
                try:
                    await call(payload)
                    latencies.append(time.perf_counter() - begin)
                except grpc.aio.AioRpcError:
                    errors += 1

        cpu = {"started": time.process_time()}  # every thread of this process, gRPC's own included

        async def cpu_at_stop():  # the measured window ends at stop_at, for the server's reading too
            await asyncio.sleep(max(0.0, stop_at - time.time()))
            cpu["stopped"] = time.process_time()

        await asyncio.gather(cpu_at_stop(), *(loop() for _ in range(concurrency)))
        await channel.close()
        results.put((latencies, errors, cpu["stopped"] - cpu["started"]))

    asyncio.run(main())


def grpc_load(url: str, model_name: str, input_name: str, array: np.ndarray, concurrency: int,
              duration: float, processes: int, server: ServedProcess | None = None) -> dict:
    """With `server`, the figures carry cpu_split over the measured window, from start_at to
    start_at + duration (the generators count their own CPU in it, not their start-up)."""
    processes = max(1, min(processes, concurrency))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 2.0
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    workers = [context.Process(target=_grpc_worker, args=(url, model_name, input_name, array, share, duration,
                                                           start_at, results)) for share in shares]
    for worker in workers:
        worker.start()
    time.sleep(max(0.0, start_at - time.time()))
    before = CpuReading.now(server) if server else None
    time.sleep(max(0.0, start_at + duration - time.time()))
    after = CpuReading.now(server) if server else None  # the window the generators count their CPU in
    latencies: list[float] = []
    errors = 0
    generator_seconds = 0.0
    for _ in workers:
        part, failed, cpu_seconds = results.get(timeout=duration + 60)
        latencies += part
        errors += failed
        generator_seconds += cpu_seconds
    for worker in workers:
        worker.join()
    figures = load_figures(latencies, duration, errors)
    if before and after:
        figures.update(cpu_split(before, after, generator_seconds, figures["rps"]))
    return figures


def grpc_shared_memory_load(url: str, model_name: str, input_name: str, array: np.ndarray, duration: float) -> dict | None:
    """Concurrency 1 over gRPC with the input and output in system shared memory (Triton's extension;
    regions registered through tritonclient). Each call writes the input into its region, as a
    client with a new image each time would, and copies the output out of its region; the calls go
    through the same stub and pre-serialized request as the gRPC generator's, from a fresh process as
    its are, so the rows differ in where the tensors travel, not in the client."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            latencies = pool.submit(_shared_memory_worker, url, model_name, input_name, array, duration).result(
                timeout=duration + 60)
        except RuntimeError as error:  # the row is left out, the run goes on
            print(f"  c=1 over gRPC with shared memory failed, row left out: {error}", flush=True)
            return None
    return load_figures(latencies, duration)


def _shared_memory_worker(url: str, model_name: str, input_name: str, array: np.ndarray, duration: float) -> list[float]:
    try:
        return _shared_memory_calls(url, model_name, input_name, array, duration)
    except Exception as error:  # tritonclient's InferenceServerException cannot be unpickled in the parent
        raise RuntimeError(f"{type(error).__name__}: {error}") from None


def _shared_memory_calls(url: str, model_name: str, input_name: str, array: np.ndarray, duration: float) -> list[float]:
    import grpc
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.grpc import service_pb2

    client = grpcclient.InferenceServerClient(url)
    output = client.get_model_metadata(model_name).outputs[0]
    output_shape = [array.shape[0], *output.shape[1:]]
    output_bytes = int(np.prod(output_shape)) * 4  # FP32
    key = f"/plansmith-bench-{os.getpid()}"
    # one object each: Triton maps a region with mmap at its offset, which must then be page-aligned
    input_handle = shm.create_shared_memory_region("bench-input", f"{key}-input", array.nbytes)
    output_handle = shm.create_shared_memory_region("bench-output", f"{key}-output", output_bytes)
    input_view = shm.get_contents_as_numpy(input_handle, np.float32, array.shape)  # views of the regions
    output_view = shm.get_contents_as_numpy(output_handle, np.float32, output_shape)
    request = service_pb2.ModelInferRequest(model_name=model_name)
    tensor = request.inputs.add(name=input_name, datatype="FP32", shape=list(array.shape))
    tensor.parameters["shared_memory_region"].string_param = "bench-input"
    tensor.parameters["shared_memory_byte_size"].int64_param = array.nbytes
    wanted = request.outputs.add(name=output.name)
    wanted.parameters["shared_memory_region"].string_param = "bench-output"
    wanted.parameters["shared_memory_byte_size"].int64_param = output_bytes
    payload = request.SerializeToString()

    async def calls() -> list[float]:
        channel = grpc.aio.insecure_channel(url)
        call = model_infer_call(channel)

        async def one_call():
            np.copyto(input_view, array)
            await call(payload)
            output_view.copy()

        latencies = await back_to_back(one_call, duration)
        await channel.close()
        return latencies

    try:
        client.unregister_system_shared_memory()
        client.register_system_shared_memory("bench-input", f"{key}-input", array.nbytes)
        client.register_system_shared_memory("bench-output", f"{key}-output", output_bytes)
        latencies = asyncio.run(calls())
        client.unregister_system_shared_memory()
    finally:
        del input_view, output_view  # the handles cannot be closed while numpy views of them live
        shm.destroy_shared_memory_region(input_handle)
        shm.destroy_shared_memory_region(output_handle)
        client.close()
    return latencies


def grpc_floor(url: str, duration: float) -> float:
    """p50 of a bare ServerLive round trip at concurrency 1 with the same client stack: the part
    of the c=1 latency that is the gRPC client and transport, not inference."""
    import grpc
    from tritonclient.grpc import service_pb2

    async def main() -> list[float]:
        channel = grpc.aio.insecure_channel(url)
        call = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=service_pb2.ServerLiveRequest.SerializeToString,
                                   response_deserializer=service_pb2.ServerLiveResponse.FromString)
        latencies = await back_to_back(lambda: call(service_pb2.ServerLiveRequest()), duration)
        await channel.close()
        return latencies

    return percentiles(asyncio.run(main()))[0]


# --------------------------------------------------------------------------- HTTP generator (wrk)


def http_load(port: int, model_name: str, input_name: str, array: np.ndarray, concurrency: int,
              duration: float, workdir: Path) -> dict | None:
    wrk = shutil.which("wrk")
    if not wrk:
        return None
    header = json.dumps({"inputs": [{"name": input_name, "datatype": "FP32", "shape": list(array.shape),
                                     "parameters": {"binary_data_size": array.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body_path = workdir / f"body-{model_name}.bin"
    body_path.write_bytes(header + array.tobytes())
    script = workdir / "infer.lua"
    script.write_text(WRK_SCRIPT.replace("{header_length}", str(len(header))).replace("{body_path}", str(body_path)))
    threads = 1 if concurrency < 8 else 2
    completed = subprocess.run(
        [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script),
         f"http://127.0.0.1:{port}/v2/models/{model_name}/infer"], capture_output=True, text=True, timeout=duration + 60)
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", completed.stdout)
    if not match:
        raise RuntimeError(f"wrk failed: {completed.stdout}\n{completed.stderr}")
    requests, duration_us, p50, p95, p99, status_errors, socket_errors = map(int, match.groups())
    return {"rps": requests / (duration_us / 1e6), "p50": p50 / 1000, "p95": p95 / 1000, "p99": p99 / 1000,
            "errors": status_errors + socket_errors}


def machine_idle_seconds() -> float:
    """Idle (and I/O wait) time of all CPUs since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / CLOCK_TICKS


@dataclass(frozen=True)
class CpuReading:
    server_seconds: float  # CPU time of the server's processes
    idle_seconds: float  # of the whole machine
    at: float  # time.monotonic()

    @classmethod
    def now(cls, server: ServedProcess) -> "CpuReading":
        return cls(server.cpu_seconds(), machine_idle_seconds(), time.monotonic())


def cpu_split(before: CpuReading, after: CpuReading, generator_seconds: float, rps: float) -> dict:
    """Where the machine's CPU went between two readings, in cores: the server (every thread and
    process), the load generator, what stayed idle; and the server's CPU a request."""
    elapsed = after.at - before.at
    server_cores = (after.server_seconds - before.server_seconds) / elapsed
    return {"server_cores": server_cores, "generator_cores": generator_seconds / elapsed,
            "idle_cores": (after.idle_seconds - before.idle_seconds) / elapsed,
            "server_us": server_cores * 1e6 / rps if rps else float("nan")}


def with_cpu_split(server: ServedProcess, run) -> dict | None:
    """`run()`'s figures (a load run by a generator child process that has exited when it returns:
    wrk) with cpu_split over it."""
    before, children_before = CpuReading.now(server), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    after, children_after = CpuReading.now(server), resource.getrusage(resource.RUSAGE_CHILDREN)
    if result is None:
        return None
    generator = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    return {**result, **cpu_split(before, after, generator, result["rps"])}


# --------------------------------------------------------------------------- in-process ceiling


def _items_per_second(sessions: list, input_name: str, feeds_array: np.ndarray, seconds: float) -> float:
    """Items/s of `sessions` each running back to back in its own thread (session.run releases the GIL)."""
    import threading

    feeds = {input_name: feeds_array}
    for session in sessions:
        for _ in range(3):
            session.run(None, feeds)
    counts = [0] * len(sessions)

    def work(index: int) -> None:
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            sessions[index].run(None, feeds)
            counts[index] += len(feeds_array)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(sessions))]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - begin)


def direct_figures(engine_path: Path, input_name: str, array: np.ndarray, duration: float) -> dict:
    """Direct ONNX Runtime in this process: batch-1 latency on the same input, and the best
    items/s over batch sizes up to the serving max (the ceiling), from one session using every core
    and from one single-threaded session per core (what `--instances N --intra-op-threads 1` serves
    with), whichever is higher."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(engine_path), providers=["CPUExecutionProvider"])
    for _ in range(50):
        session.run(None, {input_name: array})
    latencies = []
    stop_at = time.perf_counter() + duration / 2
    while time.perf_counter() < stop_at:
        begin = time.perf_counter()
        session.run(None, {input_name: array})
        latencies.append(time.perf_counter() - begin)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    per_core = [ort.InferenceSession(str(engine_path), options, providers=["CPUExecutionProvider"])
                for _ in range(os.cpu_count() or 1)]
    best = (0.0, 1, 1, 0)  # items/s, batch size, sessions, intra-op threads a session (0: every core)
    for batch in (1, 4, 8, 16, 32):
        batched = np.repeat(array, batch, axis=0)
        best = max(best, (_items_per_second([session], input_name, batched, duration / 10), batch, 1, 0),
                   (_items_per_second(per_core, input_name, batched, duration / 10), batch, len(per_core), 1))
    items, batch, sessions, threads = best
    return {"p50": percentiles(latencies)[0], "ceiling": items, "ceiling_batch": batch, "ceiling_sessions": sessions,
            "ceiling_threads": threads,
            "ceiling_how": f"{sessions} single-threaded sessions" if threads else "1 session on every core"}


# --------------------------------------------------------------------------- main


def build(kind: str, workdir: Path) -> tuple[str, Path, str, np.ndarray]:
    from plansmith import testmodels
    from plansmith.validation import parse_spec
    from plansmith_builder.build import BuildRequest, run_build

    models = {"mlp": testmodels.mlp, "small_cnn": testmodels.small_cnn,
              # the same CNN on ImageNet-sized images: about 3 ms of compute an image here, so compute, not
              # the request path, dominates (like the mobile CNN of the Triton reference, ceiling ~300/s)
              "cnn224": lambda path: testmodels.small_cnn(path, image_size=224)}
    info = models[kind](workdir / f"{kind}.onnx")
    spec = parse_spec({"model": {"uri": f"file://{info.path}", "inputs": info.spec_inputs()},
                       "build": {"backend": "onnxruntime", "precision": "fp32"},
                       "storage": {"uri": f"file://{workdir}/store"}})
    result = run_build(BuildRequest(spec=spec, workdir=workdir / f"build-{kind}"))
    if result.status not in ("built", "hit"):
        raise SystemExit(f"build of {kind} failed: {result.to_json()}")
    engine = Path(result.manifest_uri.removeprefix("file://")).parent / result.manifest.artifact("engine").name
    return result.manifest_uri, engine, info.input_name, info.sample_inputs(batch=1, seed=3)[info.input_name]


def measure(server, server_name: str, kind: str, layout: Layout, batching: bool, levels: list[int], input_name: str,
            array: np.ndarray, args: argparse.Namespace, workdir: Path, error_floor: bool = False) -> list[dict]:
    """Every concurrency level over gRPC and HTTP against one running server; with `error_floor`,
    also unknown-model requests over HTTP at the top level (the request path's bound, see main)."""
    rows = []
    for concurrency in levels:
        before = server.counters()
        figures = {"grpc": grpc_load(f"127.0.0.1:{server.grpc}", "model", input_name, array, concurrency,
                                     args.duration, args.processes, server)}
        if concurrency == 1 and figures["grpc"]:
            figures["grpc"]["server_ms"] = server_time_ms(before, server.counters())
        if not args.no_http:
            figures["http"] = with_cpu_split(server, lambda: http_load(server.http, "model", input_name, array,
                                                                       concurrency, args.duration, workdir))
            if error_floor and concurrency == max(levels):
                # the same request for a model the server does not have: parsed, routed and answered
                # 404 over the same connections, no tensor decoded, batched, run or encoded
                figures["http-404"] = with_cpu_split(server, lambda: http_load(
                    server.http, "no-such-model", input_name, array, concurrency, args.duration, workdir))
        if concurrency == 1:
            figures["grpc+shm"] = grpc_shared_memory_load(f"127.0.0.1:{server.grpc}", "model", input_name, array,
                                                          args.duration / 2)
        batch = mean_batch(before, server.counters())
        for protocol, result in figures.items():
            if result is None:
                continue
            row = {"server": server_name, "model": kind, "layout": layout.name, "batching": "on" if batching else "off",
                   "c": concurrency, "protocol": protocol, "mean_batch": batch, **result}
            rows.append(row)
            print(f"  {server_name:9s} {kind:9s} {layout.name:10s} batching {row['batching']:3s} c={concurrency:<3d} {protocol:8s} "
                  f"{result['rps']:8.0f} req/s  p50 {result['p50']:7.2f} ms  p95 {result['p95']:7.2f} ms  "
                  f"p99 {result['p99']:7.2f} ms  errors {result['errors']}  (mean batch {batch:.1f} over both)"
                  + (f"\n      CPU, in cores: server {result['server_cores']:.2f} ({result['server_us']:.1f} us a request), "
                     f"{'wrk' if protocol.startswith('http') else 'generators'} {result['generator_cores']:.2f}, idle {result['idle_cores']:.2f}" if "server_cores" in result else ""),
                  flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--models", default="mlp,small_cnn,cnn224", help="of mlp, small_cnn, cnn224")
    parser.add_argument("--processes", type=int, default=2, help="gRPC generator processes")
    parser.add_argument("--no-http", action="store_true", help="skip the wrk HTTP runs")
    parser.add_argument("--batching", default="on,off", help="on, off or both")
    parser.add_argument("--server-args", default="", help="extra `plansmith serve` flags, e.g. '--instances 2'")
    parser.add_argument("--triton-reference", action="store_true",
                        help="also serve each engine from a real Triton server (bench/triton_reference.py) and compare")
    parser.add_argument("--throughput-layout", default="cnn224", metavar="MODELS",
                        help="models also served in the throughput layout at the top concurrency ('' for none)")
    args = parser.parse_args()
    if not args.no_http and not shutil.which("wrk"):
        parser.error("the HTTP runs need wrk (apt-get install wrk), or pass --no-http")
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="plansmith-bench-"))
    rows: list[dict] = []
    summary: dict = {}
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the run", flush=True)
    for kind in args.models.split(","):
        manifest_uri, engine, input_name, array = build(kind, workdir)
        direct = direct_figures(engine, input_name, array, args.duration)
        summary[kind] = {"direct": direct}
        print(f"\n{kind}: direct session.run p50 {direct['p50']:.3f} ms; in-process ceiling "
              f"{direct['ceiling']:.0f} items/s at batch {direct['ceiling_batch']} ({direct['ceiling_how']})", flush=True)
        layouts = [(DEFAULT_LAYOUT, levels)]
        if kind in args.throughput_layout.split(","):
            layout = throughput_layout(direct)
            print(f"  {kind}: the throughput layout, as the ceiling ran: {layout.describe()}", flush=True)
            layouts.append((layout, [max(levels)]))  # a layout for load: at c=1 a request would get one core
        for layout, layout_levels in layouts:
            for batching in [mode == "on" for mode in args.batching.split(",")]:
                server = Server(manifest_uri, batching, workdir / f"{kind}-{layout.name}-{batching}.log",
                                args.server_args.split(), layout)
                try:
                    if batching and 1 in layout_levels:
                        summary[kind]["floor"] = grpc_floor(f"127.0.0.1:{server.grpc}", args.duration / 2)
                    rows += measure(server, "plansmith", kind, layout, batching, layout_levels, input_name, array, args,
                                    workdir, error_floor=kind == "mlp" and batching)
                finally:
                    server.stop()
                if args.triton_reference:
                    from triton_reference import TritonServer

                    triton = TritonServer(engine, batching, layout, QUEUE_DELAY_US, workdir, free_port)
                    try:
                        rows += measure(triton, "triton", kind, layout, batching, layout_levels, input_name, array, args,
                                        workdir)
                    finally:
                        triton.stop()
        # The machine is shared: measure the ceiling again after the served runs and keep the
        # higher one, so the served/ceiling ratio is not flattered by a slow first measurement.
        again = direct_figures(engine, input_name, array, args.duration)
        if again["ceiling"] > direct["ceiling"]:
            direct.update({key: value for key, value in again.items() if key.startswith("ceiling")})
        direct["p50"] = min(direct["p50"], again["p50"])
        print(f"  {kind}: ceiling measured again after the runs: {again['ceiling']:.0f} items/s "
              f"(batch {again['ceiling_batch']}, {again['ceiling_how']}); using {direct['ceiling']:.0f}", flush=True)

    def find(model, batching, c, protocol="grpc", server="plansmith", layout="default"):
        for row in rows:
            if ((row["server"], row["model"], row["layout"], row["batching"], row["c"], row["protocol"])
                    == (server, model, layout, batching, c, protocol)):
                return row
        return None

    print("\nRatios (targets in brackets):")
    top = max(levels)
    for protocol in ("grpc", "http"):
        on, off = find("mlp", "on", top, protocol), find("mlp", "off", top, protocol)
        if on and off:
            print(f"  MLP {protocol} c={top}: batching on/off throughput {on['rps'] / off['rps']:.2f}x [>= 5x]; "
                  f"p99 on {on['p99']:.2f} ms vs off {off['p99']:.2f} ms [on lower]")
            error_replies = find("mlp", "on", top, "http-404")
            if protocol == "http" and error_replies:
                print(f"    server CPU a request: {on['server_us']:.1f} us batching on, {off['server_us']:.1f} us off "
                      f"(its event loop is one thread: {on['server_cores']:.2f} / {off['server_cores']:.2f} cores busy, "
                      f"{on['idle_cores']:.2f} / {off['idle_cores']:.2f} idle)\n"
                      f"    bound: the same request for an unknown model, answered 404 over the same connections, "
                      f"{error_replies['rps']:.0f} req/s at {error_replies['server_us']:.1f} us a request = "
                      f"{error_replies['rps'] / off['rps']:.2f}x batching off: about the most a request that is "
                      f"also decoded, batched, run and encoded can be served at (the 404 builds an error body "
                      f"it does not)")
        for kind in ("small_cnn", "cnn224"):
            for layout in ("default", "throughput"):
                for batching in ("on", "off"):
                    cnn = find(kind, batching, top, protocol, layout=layout)
                    if cnn and kind in summary:
                        ceiling = summary[kind]["direct"]["ceiling"]
                        print(f"  {kind} {protocol} c={top} {layout} layout, batching {batching}: {cnn['rps']:.0f} "
                              f"items/s = {100 * cnn['rps'] / ceiling:.0f}% of the in-process ceiling {ceiling:.0f} "
                              f"items/s [>= 80%]")
    for kind in summary:
        floor = summary[kind].get("floor")
        for batching in ("on", "off"):  # batching on waits out maxQueueDelayMicroseconds by design (Triton too)
            row = find(kind, batching, 1)
            if row:
                added = row["p50"] - summary[kind]["direct"]["p50"]
                print(f"  {kind} c=1 batching {batching} gRPC p50 {row['p50']:.3f} ms vs direct session.run "
                      f"{summary[kind]['direct']['p50']:.3f} ms: added {added:.3f} ms [<= 1 ms]"
                      + (f"; of which a bare gRPC ServerLive round trip with the same client is {floor:.3f} ms"
                         if floor else ""))
                for server in ("plansmith", "triton"):
                    timed = find(kind, batching, 1, server=server)
                    if timed and timed.get("server_ms") is not None:
                        print(f"    {server}: inside the server {timed['server_ms']:.3f} ms a request (mean of its "
                              f"request-duration counter, {timed['server_ms'] - summary[kind]['direct']['p50']:+.3f} ms "
                              f"over the direct run), outside it (client and transport) {timed['p50'] - timed['server_ms']:.3f} ms")
            shared = find(kind, batching, 1, "grpc+shm")
            if shared:
                print(f"    with the tensors in system shared memory: p50 {shared['p50']:.3f} ms, added "
                      f"{shared['p50'] - summary[kind]['direct']['p50']:.3f} ms")
    if args.triton_reference:
        print("\nplansmith against the Triton reference (same engine, batching settings and generators):")
        for row in rows:
            triton = row["server"] == "plansmith" and find(row["model"], row["batching"], row["c"], row["protocol"],
                                                           "triton", row["layout"])
            if triton:
                print(f"  {row['model']:9s} {row['layout']:10s} batching {row['batching']:3s} c={row['c']:<3d} {row['protocol']:8s} "
                      f"{row['rps']:8.0f} vs {triton['rps']:8.0f} req/s = {row['rps'] / triton['rps']:5.2f}x; "
                      f"p99 {row['p99']:7.2f} vs {triton['p99']:7.2f} ms")
    print(f"\nload average after the run {os.getloadavg()[0]:.2f} (the machine is shared; figures move with it)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
