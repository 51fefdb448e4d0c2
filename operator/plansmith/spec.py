"""The InferenceModel API: spec and status models that mirror the CRD schema.

`crds/inferencemodel.yaml` is generated from these classes (`plansmith.crd`), and a test
checks that the committed CRD is exactly what they generate, so the two cannot drift.
Field descriptions here are what `kubectl explain inferencemodel.spec...` shows.

Names are snake_case in Python and camelCase on the wire (YAML, the Kubernetes API).
Structural rules (types, enums, minimums) live in the schema and are enforced by the API
server; rules that relate several fields live in `plansmith.validation`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_GROUP = "plansmith.io"
API_VERSION = "v1alpha1"
KIND = "InferenceModel"
PLURAL = "inferencemodels"

STORAGE_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file:///.*)$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
COMPUTE_CAPABILITY_PATTERN = r"^[0-9]{1,2}\.[0-9]$"
MIG_PROFILE_PATTERN = r"^[1-7]g\.[0-9]+gb(\+me)?$"

Dimension = Annotated[int, Field(ge=1)]
# A Kubernetes resource quantity ("2", "500m", "8Gi") or a plain number.
Quantity = int | str


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=False,
    )

    def to_api(self) -> dict:
        """The object as the Kubernetes API spells it (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- spec.model


class InputShape(ApiModel):
    """Shape range of one model input with dynamic dimensions. TensorRT builds one
    optimization profile from it; the accuracy gate and warmup draw inputs within it."""

    name: str = Field(min_length=1, description="Input tensor name as declared in the ONNX graph.")
    min_shape: list[Dimension] = Field(
        min_length=1, description="Smallest shape the engine must accept, one entry per dimension."
    )
    opt_shape: list[Dimension] = Field(
        min_length=1,
        description="Shape the engine is tuned for (TensorRT picks kernels for it); usually the common batch size.",
    )
    max_shape: list[Dimension] = Field(
        min_length=1,
        description="Largest shape the engine must accept. Dimension 0 bounds the serving batch size.",
    )


class ModelSource(ApiModel):
    """Where the ONNX model comes from."""

    uri: str = Field(
        pattern=STORAGE_URI_PATTERN,
        description="Location of the ONNX file: s3://bucket/key (read with the storage credentials) or file:///path.",
    )
    sha256: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="Expected sha256 of the ONNX bytes (lowercase hex). The builder refuses a model that differs.",
    )
    inputs: list[InputShape] = Field(
        default_factory=list,
        description="Shape ranges for inputs whose ONNX shape has dynamic dimensions (required for those).",
    )


# --------------------------------------------------------------------------- spec.build


class Calibration(ApiModel):
    """Representative inputs for INT8/FP8 post-training calibration (and the accuracy gate)."""

    uri: str = Field(
        pattern=STORAGE_URI_PATTERN,
        description="An .npz file whose arrays are named after the model inputs, batch along dimension 0.",
    )
    samples: int = Field(default=128, ge=1, description="How many samples of the file to use for calibration.")


class AccuracyGate(ApiModel):
    """The built engine is compared with an FP32 ONNX Runtime run of the original model on
    the same inputs; an engine outside these bounds fails the build and is never published."""

    min_cosine: float = Field(
        default=0.99,
        ge=0,
        le=1,
        description="Lowest cosine similarity allowed between engine and reference outputs, per output tensor.",
    )
    max_abs_error: float | None = Field(
        default=None,
        ge=0,
        description="Largest absolute difference allowed for any output element. Unset: not checked.",
    )
    max_relative_rms_error: float | None = Field(
        default=0.5,
        ge=0,
        description=(
            "Largest RMS of (engine - reference) allowed per output, relative to the spread (standard deviation) of "
            "the reference's values, or to their RMS when they do not vary. Cosine alone misses an engine whose "
            "outputs are scaled or offset, or one that lost a small signal on a large offset (fp16). Null: not checked."
        ),
    )
    samples: int = Field(default=16, ge=1, description="How many input batches to compare.")


class BuildSpec(ApiModel):
    """How to compile the model into an engine. Every field here is part of the engine key."""

    backend: Literal["auto", "tensorrt", "onnxruntime"] = Field(
        default="auto",
        description="Engine backend. auto: TensorRT where the builder image has it, else ONNX Runtime.",
    )
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field(
        default="fp16",
        description="Lowest precision kernels may use. int8 and fp8 need quantization scales (see quantization).",
    )
    quantization: Literal["calibrated", "explicit", "dynamic"] | None = Field(
        default=None,
        description=(
            "Where int8/fp8 scales come from. calibrated: post-training calibration on build.calibration; "
            "explicit: the ONNX model already has QuantizeLinear/DequantizeLinear nodes; "
            "dynamic: ONNX Runtime only, int8 weights with activation scales computed at run time. "
            "Unset: calibrated when build.calibration is given."
        ),
    )
    calibration: Calibration | None = Field(default=None, description="Calibration data for int8/fp8.")
    workspace_mi_b: int = Field(
        default=4096,
        ge=16,
        alias="workspaceMiB",
        description="Scratch GPU memory TensorRT may use while choosing kernels, in MiB.",
    )
    optimization_level: int = Field(
        default=3,
        ge=0,
        le=5,
        description="Builder optimization level (TensorRT 0-5; ONNX Runtime maps 0 to none, 1 basic, 2 extended, 3-5 all).",
    )
    hardware_compatibility: Literal["none", "ampere+", "same-compute-capability"] = Field(
        default="none",
        description=(
            "none: the engine runs only on the compute capability it was built on. "
            "ampere+: one engine for every Ampere or newer GPU (some speed lost). "
            "same-compute-capability: any GPU of the building GPU's compute capability."
        ),
    )
    timeout_seconds: int = Field(
        default=3600, ge=60, description="Deadline of one build Job (activeDeadlineSeconds)."
    )
    accuracy: AccuracyGate = Field(
        default_factory=AccuracyGate, description="Accuracy gate against the FP32 reference."
    )


# --------------------------------------------------------------------------- spec.targets


class TargetSelector(ApiModel):
    """A GPU type to build for. Give a product name, a compute capability, or both."""

    gpu_product: str | None = Field(
        default=None,
        min_length=1,
        description="GPU product as GPU Feature Discovery labels it (nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3.",
    )
    compute_capability: str | None = Field(
        default=None,
        pattern=COMPUTE_CAPABILITY_PATTERN,
        description="CUDA compute capability, e.g. 8.0 or 9.0.",
    )


# --------------------------------------------------------------------------- spec.serving


class DynamicBatching(ApiModel):
    """Triton's dynamic batcher: concurrent requests are queued and run as one batch."""

    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Batch sizes the batcher tries to form; each at most serving.maxBatchSize.",
    )
    max_queue_delay_microseconds: int = Field(
        default=100,
        ge=0,
        description="How long a request may wait for others to fill a batch.",
    )
    max_queue_size: int = Field(
        default=1024,
        ge=1,
        description="Queued requests beyond this are rejected at once (HTTP 503 / gRPC UNAVAILABLE).",
    )
    timeout_microseconds: int = Field(
        default=0,
        ge=0,
        description="A request still queued after this long is rejected. 0: no timeout.",
    )


class MigSpec(ApiModel):
    """Serve on a Multi-Instance GPU slice instead of a whole GPU."""

    profile: str = Field(
        pattern=MIG_PROFILE_PATTERN,
        description="MIG profile, e.g. 1g.10gb or 3g.40gb; pods request nvidia.com/mig-<profile> under the mixed strategy.",
    )


class ResourceRequirements(ApiModel):
    """Compute resources of each serving container (GPU or MIG requests are added by plansmith)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Minimum resources, e.g. cpu: 2.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Maximum resources, e.g. memory: 8Gi.")


class WarmupSpec(ApiModel):
    """Requests run before a serving pod reports ready, so the first users do not pay for lazy initialization."""

    enabled: bool = Field(default=True, description="Run warmup before reporting ready.")
    iterations: int = Field(default=2, ge=1, description="Runs of each batch size the batcher can form.")


class MetricsSpec(ApiModel):
    """What the serving pods' metrics port (8002) shows beyond Triton's default counters."""

    latency_summaries: bool = Field(
        default=False,
        description="Triton's latency summaries (--metrics-config summary_latencies=true): p50, p90, p95, p99 and "
                    "p99.9 of each request's time in the server, in the queue and in compute, over the last minute.",
    )


TRACE_FILE = "/tmp/trace.json"  # in the serving pod's scratch volume


class OpenTelemetrySpec(ApiModel):
    """Where trace mode opentelemetry sends spans (Triton's --trace-config opentelemetry,... settings)."""

    url: str = Field(
        default="http://localhost:4318/v1/traces", min_length=1,
        description="The OTLP/HTTP traces endpoint of an OpenTelemetry collector, such as "
                    "http://otel-collector.observability:4318/v1/traces. Default: a collector in the pod (a sidecar).",
    )
    resource: dict[str, str] = Field(
        default_factory=dict,
        description="Resource attributes of the spans, such as service.name. The pods set service.name to the "
                    "model's name and k8s.namespace.name, k8s.deployment.name and k8s.pod.name; these override them.",
    )


class TraceSpec(ApiModel):
    """Triton's request tracing in the serving pods (its trace extension). Mode triton: every rate-th
    request's timestamps, and at level TENSORS its inputs and outputs, written as JSON to /tmp/trace.json in
    the pod (kubectl cp). Mode opentelemetry: the same requests' timestamps as OpenTelemetry spans sent to a
    collector, and every request that carries a W3C traceparent traced under its caller's span. Clients
    change level, rate and count at runtime through tritonclient's update_trace_settings."""

    level: list[Literal["TIMESTAMPS", "TENSORS"]] = Field(
        default_factory=lambda: ["TIMESTAMPS"],
        description="What a trace records: TIMESTAMPS (when the request was received, queued, computed, answered) "
                    "and/or TENSORS. Empty: tracing off until a client switches it on.",
    )
    rate: int = Field(
        default=1000, ge=0, le=4294967295,
        description="Trace every rate-th request. 0, in mode opentelemetry: only requests that carry a traceparent.",
    )
    count: int | None = Field(default=None, ge=1, description="Traces to take in all. Unset: no limit.")
    log_frequency: int = Field(
        default=0, ge=0, le=4294967295,
        description="Write the traces every logFrequency of them to /tmp/trace.json.0, .1, ... "
                    "0: append them to /tmp/trace.json every 1,000 and when the pod stops.",
    )

    mode: Literal["triton", "opentelemetry"] = Field(
        default="triton",
        description="triton: trace files in the pod. opentelemetry: spans sent to an OpenTelemetry collector "
                    "(level TIMESTAMPS only).",
    )
    opentelemetry: OpenTelemetrySpec | None = Field(
        default=None, description="Where mode opentelemetry sends spans. Unset: http://localhost:4318/v1/traces.",
    )

    def trace_config(self) -> list[str]:
        """These settings as `plansmith serve --trace-config` entries (Triton's flag)."""
        entries = [f"mode={self.mode}", f"rate={self.rate}", f"count={self.count or -1}"]
        if self.mode == "triton":
            entries += [f"triton,file={TRACE_FILE}", f"triton,log-frequency={self.log_frequency}"]
        else:
            opentelemetry = self.opentelemetry or OpenTelemetrySpec()
            entries += [f"opentelemetry,url={opentelemetry.url}",
                        *(f"opentelemetry,resource={key}={value}" for key, value in opentelemetry.resource.items())]
        return entries + [f"level={level}" for level in self.level]


class ResponseCacheSpec(ApiModel):
    """Triton's response cache in the serving pods: a request whose inputs equal an earlier one's is answered
    with that one's outputs, without running the model (for models whose outputs depend on their inputs only)."""

    size_bytes: int = Field(ge=1, description="Memory for cached responses, in bytes (Triton's --cache-config "
                                              "local,size); the least recently used go first.")

    def cache_config(self) -> str:
        """This cache as a `plansmith serve --cache-config` entry (Triton's flag)."""
        return f"local,size={self.size_bytes}"


class Toleration(ApiModel):
    """A Kubernetes toleration for the serving and build pods."""

    key: str | None = Field(default=None, description="Taint key to tolerate; empty with operator Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


RUNTIME_CONTAINER = "runtime"  # the serving container's name in each serving pod
# A container name Kubernetes accepts (an RFC 1123 label).
CONTAINER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


class EnvVar(ApiModel):
    """An environment variable of a sidecar."""

    name: str = Field(min_length=1, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str = Field(default="", description="Its value.")


class SidecarContainer(ApiModel):
    """A container added to each serving pod beside the runtime, as KServe's multi-container predictors
    add them: a preprocessing step or a client of its own. It reaches the server on localhost (8000
    HTTP, 8001 gRPC) and shares the pod's /dev/shm, so it can pass tensors through Triton's system
    shared memory extension instead of the socket."""

    name: str = Field(min_length=1, max_length=63, pattern=CONTAINER_NAME_PATTERN,
                      description="Container name, unique in the pod ('runtime' is the server's).")
    image: str = Field(min_length=1, description="Container image.")
    command: list[str] = Field(default_factory=list, description="Entrypoint (the image's when empty).")
    args: list[str] = Field(default_factory=list, description="Arguments (the image's when empty).")
    env: list[EnvVar] = Field(default_factory=list, description="Environment variables.")
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements, description="CPU and memory.")


class ServingSpec(ApiModel):
    """How the engines are served: KServe v2 / Triton protocol on ports 8000 (HTTP), 8001 (gRPC), 8002 (metrics)."""

    replicas: int = Field(default=1, ge=0, description="Serving pods per GPU type.")
    runtime: Literal["plansmith", "triton"] = Field(
        default="plansmith",
        description="plansmith: plansmith's own runtime. triton: stock Triton Inference Server with a rendered model repository.",
    )
    max_batch_size: int = Field(
        default=8,
        ge=0,
        description="Largest batch one execution runs (Triton's max_batch_size). 0: the model has no batch dimension; no batching.",
    )
    dynamic_batching: DynamicBatching | None = Field(
        default=None, description="Dynamic batcher settings. Unset: every request runs on its own."
    )
    instances: int = Field(default=1, ge=1, description="Execution instances per pod that run batches concurrently.")
    mig: MigSpec | None = Field(default=None, description="Serve on a MIG slice.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="CPU and memory of the serving container."
    )
    warmup: WarmupSpec = Field(default_factory=WarmupSpec, description="Warmup before ready.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Metrics beyond Triton's default counters.")
    trace: TraceSpec | None = Field(default=None, description="Request tracing (Triton's trace extension). Unset: none.")
    response_cache: ResponseCacheSpec | None = Field(
        default=None, description="Triton's response cache. Unset: every request runs the model.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node labels serving and build pods must match."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for serving and build pods.")
    sidecars: list[SidecarContainer] = Field(
        default_factory=list, description="Containers added to each serving pod beside the runtime (localhost, /dev/shm).")
    shared_memory_size: Quantity | None = Field(
        default=None,
        description="Size of the serving pods' /dev/shm, where Triton's system shared memory regions live (a "
                    "memory-backed emptyDir shared by the runtime and the sidecars, counted as their memory). Unset: "
                    "the container runtime's 64 MiB.")


# --------------------------------------------------------------------------- spec.storage


class SecretReference(ApiModel):
    """A Secret in the model's namespace holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""

    name: str = Field(min_length=1, description="Secret name.")


class StorageSpec(ApiModel):
    """Where engines are stored, content-addressed under engines/<key>/. Unset fields use the operator's defaults."""

    uri: str | None = Field(
        default=None,
        pattern=STORAGE_URI_PATTERN,
        description="s3://bucket/prefix or file:///path (file:// is for local use without a cluster).",
    )
    secret_ref: SecretReference | None = Field(default=None, description="Credentials for s3:// storage.")
    endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3-compatible endpoint URL (MinIO, Ceph, ...). Unset: AWS.",
    )


# --------------------------------------------------------------------------- spec


class InferenceModelSpec(ApiModel):
    """Desired state: which model, how to build it, for which GPUs, how to serve it."""

    model: ModelSource = Field(description="The ONNX model.")
    build: BuildSpec = Field(default_factory=BuildSpec, description="Engine build options.")
    targets: list[TargetSelector] = Field(
        default_factory=list,
        description="GPU types to build for. Empty: every GPU type found on the cluster's nodes.",
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="Serving options.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Engine storage.")


# --------------------------------------------------------------------------- status

ConditionType = Literal["Valid", "EnginesReady", "ServingReady", "Ready"]
Phase = Literal["Pending", "Building", "Deploying", "Ready", "Failed"]
TargetState = Literal["Pending", "Building", "Built", "Failed", "Serving"]


class Condition(ApiModel):
    """A condition in the shape of metav1.Condition."""

    type: str = Field(description="Valid, EnginesReady, ServingReady or Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this condition was computed from."
    )


class AccuracyReport(ApiModel):
    """Engine outputs compared with the FP32 reference (worst output tensor)."""

    cosine: float | None = Field(default=None, description="Lowest cosine similarity over outputs.")
    max_abs_error: float | None = Field(default=None, description="Largest absolute error over outputs.")
    relative_rms_error: float | None = Field(
        default=None, description="Largest RMS error over the reference's spread, over outputs.")


class LatencyReport(ApiModel):
    """Engine latency at batch 1, measured by the builder on the target GPU."""

    p50_ms: float | None = Field(default=None, description="Median latency in milliseconds.")
    p95_ms: float | None = Field(default=None, description="95th percentile latency in milliseconds.")
    p99_ms: float | None = Field(default=None, description="99th percentile latency in milliseconds.")


class TargetStatus(ApiModel):
    """The engine for one GPU type."""

    gpu_product: str | None = Field(default=None, description="GPU product label value.")
    compute_capability: str | None = Field(default=None, description="CUDA compute capability.")
    engine_key: str | None = Field(default=None, description="Content address of the engine.")
    engine_uri: str | None = Field(default=None, description="URI of the engine manifest.")
    sha256: str | None = Field(default=None, description="sha256 of the engine artifact.")
    backend: str | None = Field(default=None, description="tensorrt or onnxruntime.")
    backend_version: str | None = Field(default=None, description="Version of the backend that built the engine.")
    state: TargetState = Field(default="Pending", description="Pending, Building, Built, Failed or Serving.")
    reason: str | None = Field(default=None, description="Why the target is in this state (for Failed: the builder's reason).")
    message: str | None = Field(default=None, description="Details for the reason.")
    job_name: str | None = Field(default=None, description="The build Job, while or after building.")
    accuracy: AccuracyReport | None = Field(default=None, description="Accuracy against the FP32 reference.")
    latency: LatencyReport | None = Field(default=None, description="Batch-1 latency.")
    throughput: float | None = Field(default=None, description="Items per second at the largest batch.")


class ServingStatus(ApiModel):
    """Where and how well the model is served."""

    endpoint: str | None = Field(default=None, description="host:port of the HTTP endpoint (the Service).")
    replicas: int | None = Field(default=None, description="Serving pods wanted, over all GPU types.")
    ready_replicas: int | None = Field(default=None, description="Serving pods ready, over all GPU types.")


class InferenceModelStatus(ApiModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    phase: Phase | None = Field(default=None, description="Pending, Building, Deploying, Ready or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Valid, EnginesReady, ServingReady, Ready.")
    target_count: int | None = Field(default=None, description="Number of GPU types targeted.")
    engines_ready: int | None = Field(default=None, description="Number of targets with a verified engine.")
    targets: list[TargetStatus] = Field(default_factory=list, description="One record per GPU type.")
    serving: ServingStatus | None = Field(default=None, description="Serving endpoint and replicas.")


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta a manifest file carries; everything else is the API server's."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class InferenceModel(ApiModel):
    """An InferenceModel object as a YAML file or the API server holds it."""

    model_config = ConfigDict(extra="forbid")

    api_version: Literal["plansmith.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["InferenceModel"]
    metadata: ObjectMeta
    spec: InferenceModelSpec
    status: InferenceModelStatus | None = None
