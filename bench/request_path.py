"""The HTTP request path's CPU a request, in this process, without sockets.

    .venv/bin/python bench/request_path.py [--models mlp] [--rounds 400] [--repeats 3] [--trace-rate N]
        [--trace-mode triton|opentelemetry] [--response-cache]

`bench/serve.py` measures the server under real load, where the shared machine moves throughput by
10% between two runs of the same code; that hides changes of a few microseconds a request. This
drives the real request path instead (HttpConnection from `http_transport`, HttpApi, ServedModel
with the builder's engine, the dynamic batcher and ONNX Runtime) from fake transports: each round
feeds one binary-tensor infer request to each of 64 connections and runs the event loop until the
64 responses are written. It prints the process's CPU time a request (all threads) with batching
on and off, alternating the two modes `--repeats` times so that both see the same machine, and the
on/off ratio of the medians. With `--trace-rate N` a third mode runs in turn with them: batching on,
every N-th request traced (Triton's trace extension at level TIMESTAMPS, written 1,000 traces a
file), and its cost a request over batching on untraced is printed. With `--trace-mode
opentelemetry` the traces become OpenTelemetry spans instead, which the SDK's batch span processor
sends (in a thread of this process, so counted) to an OTLP/HTTP receiver in another process that
answers each export with 200. What it leaves out: the sockets' system calls and uvloop's I/O
(about 14 us a request under wrk) and the load generator. With `--response-cache` a fourth mode
runs batching on with Triton's response cache: every request repeats the first one's inputs, so all
but the first are answered from the cache, and their CPU a request is printed against running them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  (bench/serve.py: builds the generated test models' engines)

from plansmith_runtime.config import BatchingPolicy, ServingConfig  # noqa: E402
from plansmith_runtime.http_api import MAX_BODY_BYTES, HttpApi  # noqa: E402
from plansmith_runtime.http_transport import HttpConnection, HttpServer  # noqa: E402
from plansmith_runtime.log_settings import LogControl, LogSettings  # noqa: E402
from plansmith_runtime.model import LoadOptions, ServedModel  # noqa: E402
from plansmith_runtime.shared_memory import SharedMemoryRegions  # noqa: E402
from plansmith_runtime.tracing import (OPENTELEMETRY_MODE, TIMESTAMPS, OpenTelemetryConfig, TraceControl,  # noqa: E402
                                       TraceSettings)

CONNECTIONS = 64
# An OTLP/HTTP receiver that takes every export (its own process: its CPU is not the server's)
OTLP_RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class CountingTransport(asyncio.Transport):
    """Swallows what the server writes, counting responses."""

    def __init__(self, written) -> None:
        super().__init__()
        self._written = written

    def write(self, data: bytes) -> None:
        self._written()

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def infer_request(input_name: str, array: np.ndarray) -> bytes:
    header = json.dumps({"inputs": [{"name": input_name, "datatype": "FP32", "shape": list(array.shape),
                                     "parameters": {"binary_data_size": array.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + array.tobytes()
    return (b"POST /v2/models/model/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(header), len(body))) + body


def receive(connection: HttpConnection, data: bytes) -> None:
    """What the event loop does with bytes arriving on a connection (an asyncio BufferedProtocol): read
    them into the buffers the connection gives, one read at a time."""
    view = memoryview(data)
    while view:
        buffer = connection.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        connection.buffer_updated(size)
        view = view[size:]


async def cpu_per_request(manifest_uri: str, request: bytes, batching: bool, rounds: int,
                          trace: TraceSettings = TraceSettings(), response_cache_bytes: int = 0) -> float:
    policy = BatchingPolicy(max_batch_size=32, enabled=batching, max_queue_delay_us=100)
    model = ServedModel(ServingConfig("model", policy, warmup_iterations=3, response_cache_bytes=response_cache_bytes))
    await model.load(LoadOptions(manifest_uri))
    if not model.ready:
        raise SystemExit(f"model not ready: {model.reason}")
    log_control = LogControl(LogSettings(), [], logging.getLogger("plansmith-request-path"))
    trace_control = TraceControl(trace, [model.name], model.version)
    server = HttpServer(HttpApi(model, lambda: True, SharedMemoryRegions(), log_control, trace_control).handle,
                        MAX_BODY_BYTES)
    loop = asyncio.get_running_loop()
    state: dict = {}

    def written() -> None:
        state["left"] -= 1
        if state["left"] == 0:
            state["done"].set_result(None)

    connections = []
    for _ in range(CONNECTIONS):
        connection = HttpConnection(server)
        connection.connection_made(CountingTransport(written))
        connections.append(connection)

    async def run(count: int) -> None:
        for _ in range(count):
            state["left"], state["done"] = CONNECTIONS, loop.create_future()
            for connection in connections:
                receive(connection, request)
            await state["done"]

    await run(50)  # warm
    started = time.process_time()
    await run(rounds)
    elapsed = time.process_time() - started
    await model.stop(1.0)
    trace_control.close()
    return elapsed / (rounds * CONNECTIONS) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp", help="of mlp, small_cnn, cnn224")
    parser.add_argument("--rounds", type=int, default=400, help="rounds of 64 requests per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating on/off measurements")
    parser.add_argument("--trace-rate", type=int, default=0, help="also measure batching on with every N-th "
                        "request traced (0: not)")
    parser.add_argument("--response-cache", action="store_true",
                        help="also measure batching on with the response cache, every request a hit")
    parser.add_argument("--trace-mode", choices=("triton", OPENTELEMETRY_MODE), default="triton",
                        help="traces written to trace files (triton) or sent as spans (opentelemetry)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="plansmith-request-path-"))
    receiver = None
    if args.trace_rate and args.trace_mode == OPENTELEMETRY_MODE:
        receiver = subprocess.Popen([sys.executable, "-c", OTLP_RECEIVER], stdout=subprocess.PIPE, text=True)
        port = int(receiver.stdout.readline())
    for kind in args.models.split(","):
        manifest_uri, _, input_name, array = serve_bench.build(kind, workdir)
        request = infer_request(input_name, array)
        if receiver is None:
            traced = TraceSettings(level=frozenset({TIMESTAMPS}), rate=args.trace_rate, log_frequency=1000,
                                   file=str(workdir / f"{kind}-trace.json"))
        else:
            traced = TraceSettings(level=frozenset({TIMESTAMPS}), rate=args.trace_rate, mode=OPENTELEMETRY_MODE,
                                   opentelemetry=OpenTelemetryConfig(url=f"http://127.0.0.1:{port}/v1/traces"))
        figures: dict[bool | str, list[float]] = {True: [], False: [], "traced": [], "cached": []}
        for _ in range(args.repeats):
            for batching in (True, False):
                figures[batching].append(uvloop.run(cpu_per_request(manifest_uri, request, batching, args.rounds)))
            if args.trace_rate:
                figures["traced"].append(uvloop.run(cpu_per_request(manifest_uri, request, True, args.rounds, traced)))
            if args.response_cache:
                figures["cached"].append(uvloop.run(cpu_per_request(manifest_uri, request, True, args.rounds,
                                                                    response_cache_bytes=64 << 20)))
        on, off = statistics.median(figures[True]), statistics.median(figures[False])
        print(f"{kind}: CPU a request, batching on {', '.join(f'{v:.1f}' for v in figures[True])} us; "
              f"off {', '.join(f'{v:.1f}' for v in figures[False])} us")
        print(f"{kind}: in-process on/off throughput bound (off / on CPU a request, medians): {off / on:.2f}x")
        if args.trace_rate:
            with_traces = statistics.median(figures["traced"])
            print(f"{kind}: batching on, 1 request in {args.trace_rate} traced ({args.trace_mode}): "
                  f"{', '.join(f'{v:.1f}' for v in figures['traced'])} us; {with_traces - on:+.1f} us a request "
                  f"({with_traces / on - 1:+.1%}) over untraced")
        if args.response_cache:
            cached = statistics.median(figures["cached"])
            print(f"{kind}: batching on, answered from the response cache: "
                  f"{', '.join(f'{v:.1f}' for v in figures['cached'])} us; {on / cached:.2f}x fewer CPU a request "
                  "than running them")
    if receiver is not None:
        receiver.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
