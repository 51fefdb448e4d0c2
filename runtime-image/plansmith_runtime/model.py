"""One served model: loading (fetch, verify, check the machine, create executors, warm up),
readiness, and inference through the batcher. The HTTP and gRPC front ends both call `infer`."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from plansmith.manifest import Manifest, TensorSpec
from plansmith_runtime import compatibility, tracing
from plansmith_runtime.config import ServingConfig, check_against_engine
from plansmith_runtime.cpus import available_cpus
from plansmith_runtime.executors import Executor, create_executor
from plansmith_runtime.executors.device_memory import DeviceDestination
from plansmith_runtime.executors.pinned_memory import DEFAULT_POOL_BYTES, PinnedMemoryPool
from plansmith_runtime.loader import fetch_engine
from plansmith_runtime.metrics import Metrics, model_statistics
from plansmith_runtime.protocol import InvalidRequest, ModelNotFound, Signature
from plansmith_runtime.response_cache import ResponseCache, response_key
from plansmith_runtime.scheduler import DynamicBatcher
from plansmith_runtime.system_metrics import PinnedMemoryUse
from plansmith_runtime.tracing import Trace

log = logging.getLogger(__name__)

VERSION = "1"

Response = TypeVar("Response")


def _the_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return outputs


class ModelNotReady(Exception):
    """The model is loading, failed to load, or the server is stopping: HTTP 503 / gRPC UNAVAILABLE."""


@dataclass
class LoadOptions:
    manifest_uri: str
    cache_dir: Path | None = None
    endpoint: str | None = None
    pinned_memory_pool_bytes: int = DEFAULT_POOL_BYTES  # 0: GPU batches are joined in pageable memory


def warmup_inputs(inputs: list[TensorSpec], batch: int, has_batch_dim: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given batch size; dynamic non-batch dims take the opt (else min) shape."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in inputs:
        hint = tensor.opt_shape or tensor.min_shape or []
        shape = []
        for index, dim in enumerate(tensor.shape):
            if index == 0 and has_batch_dim:
                shape.append(batch)
            elif dim >= 0:
                shape.append(dim)
            else:
                shape.append(hint[index] if index < len(hint) else 1)
        dtype = np.dtype(tensor.dtype)
        if dtype.kind == "f":
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[tensor.name] = np.zeros(shape, dtype)
    return feeds


def inline_max_items(warm_compute_us: dict[int, float], limit_us: float | None = None) -> int:
    """The largest batch that may run in the event loop thread: every warmed batch size up to it
    computed in under `limit_us` (compute grows with the batch, so sizes between two warmed ones
    are bounded by the larger). 0 without warmup figures: every batch goes to an executor thread."""
    from plansmith_runtime.scheduler import INLINE_MAX_US

    limit = INLINE_MAX_US if limit_us is None else limit_us
    largest = 0
    for size in sorted(warm_compute_us):
        if warm_compute_us[size] >= limit:
            break
        largest = size
    return largest


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, the sessions' Python side, the warmup's leftovers: they
    live as long as the process) out of the garbage collector's reach (gc.freeze). Without this,
    each full collection rescanned them all: 30-50 ms pauses several times a second under load,
    which were the p99 at c=64 (MLP over HTTP: p99 36-38 ms with the pauses, 6.3 ms without)."""
    gc.collect()
    gc.freeze()


def intra_op_threads(requested: int, instances: int, cpus: int, machine_cpus: int) -> int:
    """Threads per session: as asked, else the `cpus` this process may use (cpus.available_cpus: a
    pod's CPU limit) shared between the instances. A single instance that may use every one of the
    machine's cores gets 0: the backend's default, a thread per core."""
    if requested:
        return requested
    if instances > 1:
        return max(1, cpus // instances)
    return 0 if cpus >= machine_cpus else cpus


# ServedModel.state -> the state Triton's repository index reports
REPOSITORY_STATES = {"LOADING": "LOADING", "READY": "READY", "UNAVAILABLE": "UNAVAILABLE", "STOPPING": "UNLOADING"}


class ServedModel:
    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        self.name = config.model_name
        self.version = VERSION
        self.state = "LOADING"
        self.reason = "loading the engine"
        self.metrics = Metrics(self.name, self.version, config.summary_quantiles, config.response_cache_bytes > 0)
        self.response_cache = ResponseCache(config.response_cache_bytes) if config.response_cache_bytes else None
        self.manifest: Manifest | None = None
        self.signature: Signature | None = None
        self.batcher: DynamicBatcher | None = None
        self._executors: list[Executor] = []
        self._pinned_pool: PinnedMemoryPool | None = None
        self._pinned_budget: int | None = None  # --pinned-memory-pool-byte-size, once loading began
        self._intra_op_threads = 0  # threads a session: see intra_op_threads
        self._warm_compute_us: dict[int, float] = {}  # batch size -> fastest warmup run
        self._model_config = None

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    @property
    def input_device(self) -> int | None:
        """The CUDA device whose memory the loaded executors read inputs in: a request's input in a
        CUDA shared memory region of that device is read in place. None: they read host memory."""
        return self._executors[0].device_inputs if self.ready and self._executors else None

    # ------------------------------------------------------------------ loading

    async def load(self, options: LoadOptions) -> None:
        """Load in a worker thread; on any failure stay NOT READY with the reason logged."""
        self._pinned_budget = options.pinned_memory_pool_bytes
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._load_blocking, options)
        except Exception as error:  # every load failure keeps the server up and not ready
            self._close_executors()
            self.manifest = self.signature = None  # no metadata or config for a model that did not load
            self.state = "UNAVAILABLE"
            self.reason = f"{type(error).__name__}: {error}"
            log.error("model not ready: %s", self.reason, extra={"model": self.name, "manifest": options.manifest_uri})
            return
        freeze_startup_objects()
        self.batcher = DynamicBatcher(self.config.policy, self._executors, self.metrics, self.config.queue_limit,
                                      inline_max_items(self._warm_compute_us))
        self.batcher.start()
        self.state = "READY"
        self.reason = ""
        log.info("model ready", extra={"model": self.name, "engine": self.manifest.key, "backend": self.manifest.backend,
                                       "instances": len(self._executors), "intra_op_threads": self._intra_op_threads,
                                       "inline_max_items": self.batcher.inline_max_items,
                                       "device_inputs": self.input_device})

    def _load_blocking(self, options: LoadOptions) -> None:
        directory = options.cache_dir or Path(tempfile.mkdtemp(prefix="plansmith-engine-"))
        engine = fetch_engine(options.manifest_uri, directory, options.endpoint)
        manifest = engine.manifest
        found = compatibility.problems(manifest, compatibility.this_machine())
        if found:
            raise compatibility.IncompatibleEngine("; ".join(found))
        self.config = self.config.for_engine(manifest.max_batch_size)
        check_against_engine(self.config.policy, manifest.max_batch_size)
        self.manifest = manifest
        self.signature = Signature(tuple(manifest.inputs), tuple(manifest.outputs), self.config.policy.max_batch_size)
        self._intra_op_threads = intra_op_threads(self.config.intra_op_threads, self.config.instances, available_cpus(),
                                                  os.cpu_count() or 1)
        if options.pinned_memory_pool_bytes:
            self._pinned_pool = PinnedMemoryPool(options.pinned_memory_pool_bytes)
        self._executors = [create_executor(engine, intra_op_threads=self._intra_op_threads,
                                           max_batch_size=self.config.policy.max_batch_size, pinned_pool=self._pinned_pool)
                           for _ in range(self.config.instances)]
        if self.config.warmup_enabled:
            self._warm_up()

    def _warm_up(self) -> None:
        assert self.manifest is not None
        has_batch = self.config.policy.max_batch_size > 0
        started = time.perf_counter()
        # every size the batcher forms on purpose, and every bucket an executor pads batches up to
        sizes = sorted({*self.config.warmup_batch_sizes(), *(b for e in self._executors for b in e.batch_buckets)})
        for size in sizes:
            feeds = warmup_inputs(self.manifest.inputs, size, has_batch)
            for executor in self._executors:
                for _ in range(self.config.warmup_iterations):
                    begin = time.perf_counter()
                    executor.run(executor.form_batch([feeds]))  # as the batcher runs them
                    elapsed_us = (time.perf_counter() - begin) * 1e6
                    self._warm_compute_us[max(size, 1)] = min(elapsed_us, self._warm_compute_us.get(max(size, 1), elapsed_us))
        log.info("warmup done", extra={"model": self.name, "batch_sizes": sizes,
                                       "seconds": round(time.perf_counter() - started, 3),
                                       "pinned_bytes": self._pinned_pool.used_bytes if self._pinned_pool else 0})

    def model_config(self):
        if self._model_config is None and self.manifest is not None:
            from plansmith_runtime.model_config import build_model_config

            self._model_config = build_model_config(self.name, self.manifest, self.config)
        return self._model_config

    def metadata(self) -> dict:
        if self.signature is None:
            raise ModelNotReady(f"model '{self.name}' is not ready: {self.reason}")
        from plansmith_runtime.model_config import platform_of
        from plansmith_runtime.protocol import datatype_of

        def shape(tensor: TensorSpec) -> list[int]:
            dims = list(tensor.shape)
            if self.signature.has_batch_dim:
                dims[0] = -1
            return dims

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": platform_of(self.manifest),
            "inputs": [{"name": t.name, "datatype": datatype_of(t.dtype), "shape": shape(t)} for t in self.signature.inputs],
            "outputs": [{"name": t.name, "datatype": datatype_of(t.dtype), "shape": shape(t)} for t in self.signature.outputs],
        }

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index (the model_repository extension): this server's one model,
        unless only ready models are asked for and it is not ready."""
        if ready_only and not self.ready:
            return []
        entry = {"name": self.name, "version": self.version, "state": REPOSITORY_STATES[self.state]}
        if self.reason and not self.ready:
            entry["reason"] = self.reason
        return [entry]

    def control_refusal(self, name: str, action: str) -> str:
        """Why a repository load or unload is refused: the served model is the pod's."""
        return (f"cannot {action} model '{name}': this server serves the one model it was started with ('{self.name}'); "
                "models are loaded and unloaded by changing the InferenceModel, not through the repository API")

    def statistics(self, named: bool = False) -> list[dict]:
        """The `model_stats` of Triton's statistics extension, which lists ready models only: none
        while this one loads, failed to or stops; asked for by name (`named`), such a model is the
        client's error, "requested model '...' is not available" (TRITONSERVER_ServerModelStatistics)."""
        if self.ready:
            return [model_statistics(self.name, self.version, self.metrics.stats)]
        if named:
            raise InvalidRequest(f"requested model '{self.name}' is not available")
        return []

    # ------------------------------------------------------------------ inference

    @property
    def has_batch_dim(self) -> bool:
        """Whether dim 0 of every tensor is the batch (maxBatchSize > 0), as Triton's batch properties
        say; known once the model is loaded."""
        return self.signature is not None and self.signature.has_batch_dim

    def check_version(self, version: str | None) -> None:
        if version and version != self.version:
            raise ModelNotFound(f"Request for unknown model: '{self.name}' version {version} is not found "
                                f"(serving version {self.version})")

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str], timeout_us: int = 0,
                    trace: Trace | None = None,
                    output_destinations: dict[str, DeviceDestination] | None = None,
                    respond: Callable[[dict[str, np.ndarray]], Response] = _the_outputs) -> Response:
        """What `respond` makes of the outputs asked for (all when none are; by default the outputs
        themselves). `respond` is the front end's last step that can fail for the request's sake
        (writing an output into a region too small for it): as in Triton, whose backends count a
        request whose response failed as a failure, the request counts as a success only once it
        returned. A sampled request's `trace` gets its timestamps from REQUEST_START to REQUEST_END,
        and its tensors. `output_destinations`: the request's CUDA regions on the model's device by
        output, which the executor may write directly (the output is then a DeviceTensor over its
        region), where `_writes_outputs_on_device` says."""
        received = time.monotonic_ns()
        stats = self.metrics.stats
        stats.in_flight += 1
        try:
            if not self.ready or self.batcher is None or self.signature is None:
                raise ModelNotReady(f"model '{self.name}' is not ready: {self.reason or self.state}")
            checked = self.signature.check(inputs)
            known = self.signature.output_names
            for name in outputs:
                if name not in known:
                    raise InvalidRequest(f"unexpected inference output '{name}', the model has {sorted(known)}")
            if trace is not None:
                trace.stamp(tracing.REQUEST_START, received)
                trace.record_tensors(tracing.TENSOR_QUEUE_INPUT, inputs)
            cached = cache_lookup_ns = None
            if self.response_cache is not None:
                lookup_started = time.monotonic_ns()
                key = response_key(inputs)
                cached = self.response_cache.get(key)
                cache_lookup_ns = time.monotonic_ns() - lookup_started
            if cached is not None:
                result = cached
            else:
                pending = self.batcher.enqueue(inputs, checked.batch, checked.batch_key, timeout_us, trace,
                                               output_destinations if self._writes_outputs_on_device else None)
                result = await pending.future
                if self.response_cache is not None:
                    inserting = time.monotonic_ns()
                    self.response_cache.put(key, result)
                    self.metrics.record_cache_miss((cache_lookup_ns + time.monotonic_ns() - inserting) / 1000)
            if outputs:
                result = {name: result[name] for name in outputs}
            if trace is not None:
                trace.record_tensors(tracing.TENSOR_BACKEND_OUTPUT, result)
            response = respond(result)
        except BaseException:
            stats.failure += 1
            stats.failure_us += (time.monotonic_ns() - received) / 1000
            raise
        finally:
            stats.in_flight -= 1
        answered = time.monotonic_ns()
        if cached is not None:  # Triton's cache hit: a success without queue or compute
            self.metrics.record_cache_hit((answered - received) / 1000, cache_lookup_ns / 1000)
        else:
            self.metrics.record_success((answered - received) / 1000, pending.queue_us)
        if trace is not None:
            trace.stamp(tracing.REQUEST_END, answered)
        return response

    @property
    def _writes_outputs_on_device(self) -> bool:
        """Whether requests' output regions go to the executor: not with the response cache, which
        keeps host copies."""
        return self.response_cache is None

    async def stop(self, grace_seconds: float) -> bool:
        """Finish the queued and running requests within the grace period and close the executors.
        False when a thread still uses them (a batch past the grace period, or a load not done):
        they are left open, as freeing their buffers under it could crash the process, which is
        exiting anyway."""
        loading = self.state == "LOADING"
        self.state = "STOPPING"
        self.reason = "the server is shutting down"
        if loading:
            log.warning("stopped while loading: executors left open", extra={"model": self.name})
            return False
        if self.batcher and not await self.batcher.close(grace_seconds):
            log.warning("executors left open: a batch is still running", extra={"model": self.name})
            return False
        self._close_executors()
        return True

    def pinned_memory(self) -> PinnedMemoryUse | None:
        """The pinned memory pool's budget and what the executors hold of it (None before loading)."""
        if self._pinned_budget is None:
            return None
        pool = self._pinned_pool
        return PinnedMemoryUse(self._pinned_budget, pool.used_bytes if pool else 0)

    def _close_executors(self) -> None:
        for executor in self._executors:
            executor.close()
        self._executors = []
        if self._pinned_pool:  # after the executors: their buffers are the pool's
            self._pinned_pool.close()
            self._pinned_pool = None
