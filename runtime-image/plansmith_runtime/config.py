"""Serving settings: what the batcher, the executors and warmup need, from the spec or from flags."""

from __future__ import annotations

from dataclasses import dataclass, replace

from plansmith.spec import ServingSpec
from plansmith_runtime.system_metrics import DEFAULT_INTERVAL_MS
from plansmith_runtime.tracing import TraceSettings


class ConfigError(ValueError):
    """Serving settings that cannot work with this engine."""


@dataclass(frozen=True)
class BatchingPolicy:
    """Triton's dynamic batcher settings. `max_batch_size == 0` or `enabled == False`: every request
    runs on its own."""

    max_batch_size: int = 0
    enabled: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # 0: unbounded in Triton; we bound it (see ServingConfig.queue_limit)
    timeout_us: int = 0  # 0: requests never time out in the queue

    @property
    def batching(self) -> bool:
        return self.enabled and self.max_batch_size > 0

    @property
    def target_batch_size(self) -> int:
        """The size at which a batch is sent without waiting: the largest preferred size, else max."""
        if self.preferred_batch_sizes:
            return max(self.preferred_batch_sizes)
        return self.max_batch_size


DEFAULT_QUEUE_LIMIT = 1024  # when the spec leaves maxQueueSize 0: bounded memory, never unbounded


@dataclass(frozen=True)
class ServingConfig:
    model_name: str
    policy: BatchingPolicy
    instances: int = 1
    warmup_enabled: bool = True
    warmup_iterations: int = 2
    intra_op_threads: int = 0  # 0: the backend decides
    grace_seconds: float = 30.0
    metrics_interval_ms: int = DEFAULT_INTERVAL_MS  # how often the GPU and CPU metrics are polled
    summary_quantiles: tuple[tuple[float, float], ...] = ()  # latency summaries' (quantile, error); (): off
    trace: TraceSettings = TraceSettings()  # the trace settings the server starts with (--trace-config)
    response_cache_bytes: int = 0  # Triton's local response cache (--cache-config local,size=N); 0: none
    max_batch_from_engine: bool = False  # no spec and no --max-batch-size: use the engine's maxBatchSize

    def for_engine(self, engine_max_batch: int) -> "ServingConfig":
        """These settings with the batch size filled in from the engine when nobody chose one."""
        if not self.max_batch_from_engine:
            return self
        preferred = tuple(size for size in self.policy.preferred_batch_sizes if size <= engine_max_batch)
        policy = replace(self.policy, max_batch_size=engine_max_batch, preferred_batch_sizes=preferred)
        return replace(self, policy=policy, max_batch_from_engine=False)

    @property
    def queue_limit(self) -> int:
        return self.policy.max_queue_size or DEFAULT_QUEUE_LIMIT

    def warmup_batch_sizes(self) -> list[int]:
        """Every batch size the batcher will form on purpose: 1, the preferred sizes and the maximum."""
        if not self.policy.batching:
            return [1] if self.policy.max_batch_size > 0 else [0]
        sizes = {1, self.policy.max_batch_size, *self.policy.preferred_batch_sizes}
        return sorted(sizes)


def policy_from_spec(serving: ServingSpec) -> BatchingPolicy:
    dynamic = serving.dynamic_batching
    if dynamic is None:
        return BatchingPolicy(max_batch_size=serving.max_batch_size, enabled=False)
    return BatchingPolicy(
        max_batch_size=serving.max_batch_size,
        enabled=True,
        preferred_batch_sizes=tuple(sorted(set(dynamic.preferred_batch_sizes))),
        max_queue_delay_us=dynamic.max_queue_delay_microseconds,
        max_queue_size=dynamic.max_queue_size,
        timeout_us=dynamic.timeout_microseconds,
    )


def check_against_engine(policy: BatchingPolicy, engine_max_batch: int) -> None:
    """The serving batch size must fit the engine (its profiles bound dim 0)."""
    if policy.max_batch_size > 0 and engine_max_batch == 0:
        raise ConfigError(f"maxBatchSize {policy.max_batch_size} but the engine's inputs have no batch dimension")
    if policy.max_batch_size > engine_max_batch:
        raise ConfigError(f"maxBatchSize {policy.max_batch_size} is larger than the engine accepts ({engine_max_batch})")
    for size in policy.preferred_batch_sizes:
        if size > policy.max_batch_size:
            raise ConfigError(f"preferred batch size {size} is larger than maxBatchSize {policy.max_batch_size}")
