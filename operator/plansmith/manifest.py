"""The engine manifest: what the builder publishes last at <storage>/engines/<key>/manifest.json and
what the runtime and operator read. A key without a manifest is not an engine.

The manifest is schema-versioned; readers refuse a newer major version than they know. Artifact
paths are relative to the manifest's folder, each with its sha256 and size so a reader can verify
every byte before use.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class TensorSpec(ManifestModel):
    """One input or output of the engine. `shape` uses -1 for dynamic dimensions."""

    name: str
    dtype: str = Field(description="numpy dtype name: float32, float16, int64, uint8, ...")
    shape: list[int]
    min_shape: list[int] | None = None
    opt_shape: list[int] | None = None
    max_shape: list[int] | None = None


class Artifact(ManifestModel):
    name: str = Field(description="File name relative to the manifest's folder, e.g. model.plan or model.onnx")
    role: Literal["engine", "timing-cache", "reference", "other"] = "engine"
    sha256: str
    bytes: int


class ManifestTarget(ManifestModel):
    device: Literal["gpu", "cpu"]
    compute_capability: str | None = None
    gpu_product: str | None = None
    driver_version: str | None = None
    cpu_isa: str | None = None
    cpu_vendor: str | None = None
    hardware_compatibility: str = "none"
    execution_provider: str | None = Field(
        default=None, description="For onnxruntime engines: CPUExecutionProvider or CUDAExecutionProvider"
    )


class OutputAccuracy(ManifestModel):
    cosine: float
    max_abs_error: float
    max_rel_error: float
    relative_rms_error: float | None = Field(
        default=None, description="RMS of (engine - reference) over the reference's spread; absent in older manifests")


class AccuracyResult(ManifestModel):
    """Engine vs FP32 ONNX Runtime reference on the same inputs; the worst output decides."""

    cosine: float
    max_abs_error: float
    max_rel_error: float
    relative_rms_error: float | None = None
    samples: int
    per_output: dict[str, OutputAccuracy] = Field(default_factory=dict)
    min_cosine: float = Field(description="The gate the engine was built under")
    max_abs_error_allowed: float | None = None
    max_relative_rms_error_allowed: float | None = None


class LatencyFigures(ManifestModel):
    batch_size: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float = Field(description="Items per second at this batch size")


class BenchmarkResult(ManifestModel):
    batch1: LatencyFigures
    max_batch: LatencyFigures | None = None
    reference_batch1: LatencyFigures | None = Field(default=None, description="The FP32 reference model")
    reference_max_batch: LatencyFigures | None = None


class SourceModel(ManifestModel):
    uri: str
    sha256: str
    opset: int | None = None


class Manifest(ManifestModel):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    key: str
    backend: Literal["tensorrt", "onnxruntime"]
    backend_version: str
    target: ManifestTarget
    precision: str
    quantization: str | None = None
    effective_precision: str | None = Field(
        default=None,
        description="Precision the engine's kernels actually use when it differs from `precision` (the spec's "
        "lowest allowed precision), e.g. fp32 for an fp16 spec on a CPU target",
    )
    build_options: dict = Field(description="The options document that went into the key")
    source: SourceModel
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = Field(description="Largest dim-0 the engine accepts; 0 when inputs have no batch dimension")
    artifacts: list[Artifact]
    accuracy: AccuracyResult | None = None
    benchmark: BenchmarkResult | None = None
    build_seconds: float
    builder_version: str
    created_at: str

    def artifact(self, role: str = "engine") -> Artifact:
        for artifact in self.artifacts:
            if artifact.role == role:
                return artifact
        raise KeyError(f"manifest {self.key} has no {role} artifact")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2, sort_keys=True) + "\n"


class ManifestError(ValueError):
    """Not a manifest this reader understands."""


def parse_manifest(data: bytes | str) -> Manifest:
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"manifest is not JSON: {error}") from None
    version = raw.get("schemaVersion") if isinstance(raw, dict) else None
    if not isinstance(version, int) or version > MANIFEST_SCHEMA_VERSION:
        raise ManifestError(f"unsupported manifest schemaVersion {version!r} (this reader knows {MANIFEST_SCHEMA_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except Exception as error:  # pydantic.ValidationError, reported as a manifest problem
        raise ManifestError(f"invalid manifest: {error}") from None
