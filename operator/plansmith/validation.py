"""Turning untrusted YAML/dicts into a valid InferenceModel, or a list of problems with field paths.

Two layers: the structural rules the CRD schema also enforces (types, enums, minimums,
unknown fields) come from pydantic; the rules that relate several fields, which an
OpenAPI schema on Kubernetes 1.20 cannot express, are `semantic_problems`. Both report
`Problem(path, message)` with paths as a user writes them: `spec.model.inputs[0].maxShape`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from plansmith.spec import (
    COMPUTE_CAPABILITY_PATTERN,
    CONTAINER_NAME_PATTERN,
    ENV_NAME_PATTERN,
    MIG_PROFILE_PATTERN,
    RUNTIME_CONTAINER,
    SHA256_PATTERN,
    STORAGE_URI_PATTERN,
    InferenceModel,
    InferenceModelSpec,
)

GPU_RESOURCE = "nvidia.com/gpu"


def is_gpu_resource(name: str) -> bool:
    """A whole GPU or a MIG slice (nvidia.com/mig-<profile>): what plansmith adds to serving pods itself."""
    return name == GPU_RESOURCE or name.startswith("nvidia.com/mig-")


# What a pattern means, in words a user understands better than the regular expression.
PATTERN_MEANINGS = {
    STORAGE_URI_PATTERN: "must be s3://bucket/key or file:///absolute/path",
    SHA256_PATTERN: "must be 64 lowercase hex digits",
    COMPUTE_CAPABILITY_PATTERN: "must look like 8.0 or 9.0",
    MIG_PROFILE_PATTERN: "must be a MIG profile such as 1g.10gb or 3g.40gb",
    CONTAINER_NAME_PATTERN: "must be lowercase letters, digits and '-', starting and ending with a letter or digit",
    ENV_NAME_PATTERN: "must be letters, digits, '_', '-' or '.', not starting with a digit",
}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidSpec(ValueError):
    """The object is not a valid InferenceModel; `problems` says where and why."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def format_path(loc: Iterable[str | int]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _pydantic_problems(error: ValidationError, prefix: tuple[str | int, ...]) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        loc = prefix + tuple(item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "string_pattern_mismatch" and item["ctx"]["pattern"] in PATTERN_MEANINGS:
            message = f"{PATTERN_MEANINGS[item['ctx']['pattern']]} (got {item['input']!r})"
        elif "input" in item and item["type"] not in ("model_type", "dict_type"):
            message = f"{message} (got {item['input']!r})"
        problems.append(Problem(format_path(loc), message))
    return problems


# Kubernetes' resource quantity grammar (k8s.io/apimachinery/pkg/api/resource): a decimal number and
# a binary-SI, decimal-SI or exponent suffix. The API server refuses anything else, which would
# reach the operator only when it applies the Deployment.
QUANTITY_PATTERN = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?")


def is_quantity(value: int | str) -> bool:
    return isinstance(value, int) or QUANTITY_PATTERN.fullmatch(value) is not None


def semantic_problems(spec: InferenceModelSpec) -> list[Problem]:
    """Rules between fields that the CRD schema cannot express. Pure; returns all problems."""
    problems: list[Problem] = []
    add = lambda path, message: problems.append(Problem(path, message))  # noqa: E731

    seen_inputs: set[str] = set()
    for i, shape in enumerate(spec.model.inputs):
        at = f"spec.model.inputs[{i}]"
        if shape.name in seen_inputs:
            add(f"{at}.name", f"input {shape.name!r} is listed twice")
        seen_inputs.add(shape.name)
        ranks = {len(shape.min_shape), len(shape.opt_shape), len(shape.max_shape)}
        if len(ranks) != 1:
            add(at, "minShape, optShape and maxShape must have the same number of dimensions")
            continue
        for d, (lo, opt, hi) in enumerate(zip(shape.min_shape, shape.opt_shape, shape.max_shape)):
            if not lo <= opt <= hi:
                add(f"{at}.optShape[{d}]", f"need minShape <= optShape <= maxShape, got {lo} <= {opt} <= {hi}")
        if spec.serving.max_batch_size > shape.max_shape[0]:
            add(
                "spec.serving.maxBatchSize",
                f"{spec.serving.max_batch_size} exceeds maxShape[0]={shape.max_shape[0]} of input {shape.name!r}",
            )

    build = spec.build
    if build.precision in ("int8", "fp8"):
        if build.quantization is None and build.calibration is None:
            add(
                "spec.build.calibration",
                f"{build.precision} needs calibration data, or quantization: explicit for a model with "
                "QuantizeLinear/DequantizeLinear nodes"
                + (", or quantization: dynamic (onnxruntime)" if build.precision == "int8" else ""),
            )
        if build.quantization == "calibrated" and build.calibration is None:
            add("spec.build.calibration", "quantization: calibrated needs build.calibration")
    elif build.quantization == "dynamic":
        add("spec.build.quantization", "dynamic quantization is int8 only")
    if build.quantization == "dynamic" and build.backend == "tensorrt":
        add("spec.build.quantization", "TensorRT has no dynamic quantization; use calibrated or explicit")
    if build.quantization == "dynamic" and build.precision == "fp8":
        add("spec.build.quantization", "fp8 cannot be quantized dynamically")
    if build.precision == "fp8" and build.backend == "onnxruntime":
        add("spec.build.precision", "the onnxruntime backend has no fp8 engines; use backend tensorrt or auto")

    seen_targets: set[tuple[str | None, str | None]] = set()
    for i, target in enumerate(spec.targets):
        if target.gpu_product is None and target.compute_capability is None:
            add(f"spec.targets[{i}]", "give gpuProduct, computeCapability or both")
        ident = (target.gpu_product, target.compute_capability)
        if ident in seen_targets:
            add(f"spec.targets[{i}]", "this target is listed twice")
        seen_targets.add(ident)

    serving = spec.serving
    batching = serving.dynamic_batching
    if batching is not None:
        if serving.max_batch_size == 0:
            add("spec.serving.dynamicBatching", "dynamic batching needs maxBatchSize >= 1")
        for j, size in enumerate(batching.preferred_batch_sizes):
            if size > serving.max_batch_size:
                add(
                    f"spec.serving.dynamicBatching.preferredBatchSizes[{j}]",
                    f"{size} is larger than maxBatchSize {serving.max_batch_size}",
                )
        if len(set(batching.preferred_batch_sizes)) != len(batching.preferred_batch_sizes):
            add("spec.serving.dynamicBatching.preferredBatchSizes", "sizes must be distinct")
    trace = serving.trace
    if trace is not None:
        if trace.mode == "triton" and trace.opentelemetry is not None:
            add("spec.serving.trace.opentelemetry", "applies to mode opentelemetry")
        if trace.mode == "triton" and trace.rate == 0:
            add("spec.serving.trace.rate", "0 traces nothing in mode triton (only mode opentelemetry traces the "
                                           "requests that carry a traceparent)")
        if trace.mode == "opentelemetry" and "TENSORS" in trace.level:
            add("spec.serving.trace.level", "TENSORS is written to trace files only (mode triton)")
        if trace.mode == "opentelemetry" and trace.log_frequency:
            add("spec.serving.trace.logFrequency", "applies to mode triton's trace files")
        for key in (trace.opentelemetry.resource if trace.opentelemetry else {}):
            if not key or "=" in key:
                add("spec.serving.trace.opentelemetry.resource", f"{key!r} is not an attribute name")
    if build.hardware_compatibility != "none" and build.backend == "onnxruntime":
        add("spec.build.hardwareCompatibility", "applies to TensorRT plans; an onnxruntime engine is keyed and checked "
                                                "per compute capability")
    quantities = [(f"spec.serving.resources.{kind}.{name}", value) for kind in ("requests", "limits")
                  for name, value in getattr(serving.resources, kind).items()]
    quantities += [(f"spec.serving.sidecars[{i}].resources.{kind}.{name}", value)
                   for i, sidecar in enumerate(serving.sidecars) for kind in ("requests", "limits")
                   for name, value in getattr(sidecar.resources, kind).items()]
    if serving.shared_memory_size is not None:
        quantities.append(("spec.serving.sharedMemorySize", serving.shared_memory_size))
    for path, value in quantities:
        if not is_quantity(value):
            add(path, f"{value!r} is not a Kubernetes quantity (like 2, 500m, 1.5, 8Gi or 1G)")
    for kind in ("requests", "limits"):
        for name in getattr(serving.resources, kind):
            if is_gpu_resource(name):
                add(
                    f"spec.serving.resources.{kind}",
                    f"{name} is added by plansmith per target; use serving.mig for MIG slices",
                )

    container_names = {RUNTIME_CONTAINER}
    for i, sidecar in enumerate(serving.sidecars):
        if sidecar.name in container_names:
            add(f"spec.serving.sidecars[{i}].name", f"{sidecar.name!r} is taken"
                + (" by the serving container" if sidecar.name == RUNTIME_CONTAINER else " by another sidecar"))
        container_names.add(sidecar.name)
        for kind in ("requests", "limits"):
            if any(is_gpu_resource(name) for name in getattr(sidecar.resources, kind)):
                add(f"spec.serving.sidecars[{i}].resources.{kind}", "GPUs go to the serving container")
        env_names: set[str] = set()
        for j, variable in enumerate(sidecar.env):  # server-side apply keys env by name: a repeat is refused
            if variable.name in env_names:
                add(f"spec.serving.sidecars[{i}].env[{j}].name", f"{variable.name!r} is set twice")
            env_names.add(variable.name)

    storage = spec.storage
    if storage.uri and storage.uri.startswith("file://"):
        if storage.secret_ref is not None:
            add("spec.storage.secretRef", "credentials apply to s3:// storage only")
        if storage.endpoint is not None:
            add("spec.storage.endpoint", "an endpoint applies to s3:// storage only")
    return problems


def parse_spec(raw: Any, *, path_prefix: tuple[str, ...] = ("spec",)) -> InferenceModelSpec:
    """Validate a spec dict (as the API server stores it); raise InvalidSpec with every problem."""
    if not isinstance(raw, dict):
        raise InvalidSpec([Problem(format_path(path_prefix), "must be a mapping")])
    try:
        spec = InferenceModelSpec.model_validate(raw)
    except ValidationError as error:
        raise InvalidSpec(_pydantic_problems(error, path_prefix)) from None
    problems = semantic_problems(spec)
    if problems:
        raise InvalidSpec(problems)
    return spec


def parse_object(raw: Any) -> InferenceModel:
    """Validate a whole InferenceModel object (apiVersion, kind, metadata, spec)."""
    if not isinstance(raw, dict):
        raise InvalidSpec([Problem("", f"expected an InferenceModel mapping, got {type(raw).__name__}")])
    head: list[Problem] = []
    if raw.get("apiVersion") != "plansmith.io/v1alpha1":
        head.append(Problem("apiVersion", f"must be plansmith.io/v1alpha1 (got {raw.get('apiVersion')!r})"))
    if raw.get("kind") != "InferenceModel":
        head.append(Problem("kind", f"must be InferenceModel (got {raw.get('kind')!r})"))
    if head:
        raise InvalidSpec(head)
    try:
        obj = InferenceModel.model_validate(raw)
    except ValidationError as error:
        raise InvalidSpec(_pydantic_problems(error, ())) from None
    problems = semantic_problems(obj.spec)
    if problems:
        raise InvalidSpec(problems)
    return obj


def load_documents(text: str, source: str = "<input>") -> list[Any]:
    """Parse YAML text into documents; malformed YAML becomes InvalidSpec with line and column."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        reason = getattr(error, "problem", None) or str(error)
        raise InvalidSpec([Problem("", f"{where}: malformed YAML: {reason}")]) from None
    if not documents:
        raise InvalidSpec([Problem("", f"{source}: no YAML document found")])
    return documents


def load_models(text: str, source: str = "<input>") -> list[InferenceModel]:
    """Every InferenceModel in a YAML file; all problems of all documents in one InvalidSpec."""
    models: list[InferenceModel] = []
    problems: list[Problem] = []
    documents = load_documents(text, source)
    for index, document in enumerate(documents):
        try:
            models.append(parse_object(document))
        except InvalidSpec as error:
            prefix = f"document {index + 1}: " if len(documents) > 1 else ""
            problems.extend(Problem(p.path, prefix + p.message) for p in error.problems)
    if problems:
        raise InvalidSpec(problems)
    return models


def single_model(text: str, source: str = "<input>") -> InferenceModel:
    """The one InferenceModel a YAML text must hold (the builder, the runtime and `plansmith up` take one)."""
    models = load_models(text, source)
    if len(models) != 1:
        raise InvalidSpec([Problem("", f"expected one InferenceModel, found {len(models)}")])
    return models[0]


class SpecFileError(Exception):
    """A model file that cannot be used; the message says why, in lines meant for a terminal."""


def read_single_model(path: str) -> InferenceModel:
    """The one InferenceModel in the file at `path`, or SpecFileError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SpecFileError(f"{path}: cannot read: {getattr(error, 'strerror', None) or error}") from None
    try:
        return single_model(text, path)
    except InvalidSpec as error:
        raise SpecFileError("\n".join([f"{path}: invalid InferenceModel:", *(f"  {p}" for p in error.problems)])) from None
