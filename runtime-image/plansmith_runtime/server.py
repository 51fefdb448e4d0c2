"""The serving process: HTTP, gRPC and metrics listeners in one asyncio loop, the model loading in
the background (live at once, ready once loaded and warmed up), and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

from aiohttp import web

from plansmith_runtime.config import ServingConfig
from plansmith_runtime.cuda_shared_memory import CudaSharedMemory
from plansmith_runtime.grpc_api import create_server
from plansmith_runtime.http_api import MAX_BODY_BYTES, HttpApi, metrics_app
from plansmith_runtime.http_transport import HttpServer
from plansmith_runtime.log_settings import LogControl
from plansmith_runtime.model import VERSION, LoadOptions, ServedModel
from plansmith_runtime.shared_memory import SharedMemoryRegions
from plansmith_runtime.system_metrics import NvmlGpus, SystemMetrics
from plansmith_runtime.tracing import TraceControl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002


class Server:
    def __init__(self, config: ServingConfig, load: LoadOptions, listen: Listen, log_control: LogControl) -> None:
        self.config, self.load_options, self.listen = config, load, listen
        self.log_control = log_control  # Triton's logging extension changes it at runtime
        self.model = ServedModel(config)
        # regions registered by clients, for both front ends; inputs in a CUDA region on the model's
        # device are read there
        self.shared_memory = SharedMemoryRegions(cuda=CudaSharedMemory(input_device=lambda: self.model.input_device))
        self.trace_control = TraceControl(config.trace, [self.model.name], VERSION)  # Triton's trace extension
        self.accepting = True

    def is_ready(self) -> bool:
        return self.accepting and self.model.ready

    async def run(self) -> int:
        host = self.listen.host
        grace = self.config.grace_seconds
        http_api = HttpApi(self.model, self.is_ready, self.shared_memory, self.log_control, self.trace_control)
        http_server = HttpServer(http_api.handle, MAX_BODY_BYTES)
        system_metrics = SystemMetrics(NvmlGpus(os.environ.get("CUDA_VISIBLE_DEVICES")), self.config.metrics_interval_ms,
                                       pinned=self.model.pinned_memory)
        system_metrics.start()
        metrics_runner = web.AppRunner(metrics_app(self.model, system_metrics), access_log=None, shutdown_timeout=1.0)
        await metrics_runner.setup()
        await http_server.start(host, self.listen.http_port, backlog=2048)
        await web.TCPSite(metrics_runner, host, self.listen.metrics_port).start()
        grpc_server = create_server(self.model, self.is_ready, self.shared_memory, self.log_control, self.trace_control)
        await grpc_server.start(host, self.listen.grpc_port, backlog=2048)
        log.info("listening", extra={"http": self.listen.http_port, "grpc": self.listen.grpc_port,
                                     "metrics": self.listen.metrics_port, "host": host, "model": self.model.name})

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loader = loop.create_task(self.model.load(self.load_options))
        await stop.wait()

        log.info("shutting down: not ready, finishing in-flight requests", extra={"grace_seconds": grace})
        self.accepting = False
        ends_at = loop.time() + grace  # one grace period for the whole shutdown (Triton's --exit-timeout-secs)
        # Listeners close first and wait for the requests they accepted; the batcher keeps running
        # until then so those requests complete; then the batcher drains and the executors close.
        await asyncio.gather(grpc_server.close(grace), http_server.close(grace), return_exceptions=True)
        closed = await self.model.stop(max(0.0, ends_at - loop.time()))
        await metrics_runner.cleanup()
        system_metrics.stop()
        self.shared_memory.close()
        self.trace_control.close()  # the traces collected and not written yet (log_frequency 0: all of them)
        if not loader.done():
            loader.cancel()
        log.info("stopped")
        if not closed:
            # A thread still loads the engine or runs a batch past the grace period: the interpreter
            # would wait for it at exit (the event loop's executor and the instances' pool join their
            # threads). As Triton after --exit-timeout-secs, exit with the work in flight.
            logging.shutdown()
            os._exit(0)
        return 0


def run(config: ServingConfig, load: LoadOptions, listen: Listen, log_control: LogControl) -> int:
    server = Server(config, load, listen, log_control)
    if os.environ.get("PLANSMITH_EVENT_LOOP", "uvloop") == "uvloop":
        try:  # uvloop's libuv transports cut the per-request socket cost of the default loop
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(server.run())
    return asyncio.run(server.run())
