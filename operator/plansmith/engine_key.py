"""The engine key: the content address of a built engine.

An engine's bytes are determined by the ONNX model, the build options that change the plan, the
backend and its version, and the hardware it was built for. The key is the sha256 of a canonical
JSON document of exactly those things, so

- the same model built the same way for the same target has the same key, in any namespace, on
  any machine, in any process (no dict ordering, no floats, no timestamps in the document);
- a new TensorRT version, a new GPU type (compute capability), another precision, other shape
  ranges or other calibration data give a new key, hence a rebuild; precision and optimization
  level enter as the backend applies them (ONNX Runtime builds fp16 on a CPU as fp32, and its
  levels 3-5 are one level), so specs that build the same engine share it;
- things that do not change the bytes (serving replicas, batching, the accuracy gate, the build
  deadline, the model's URI) do not change the key.

The builder and the operator both call `engine_key`, so the operator can find a cached engine
without launching a Job. Engines live at `<storage>/engines/<key>/` with `manifest.json` last.

Key document (version 1), before hashing:

    {"keyVersion": 1, "source": {"sha256": ...}, "backend": {"name": ..., "version": ...},
     "target": {...}, "options": {...}}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from plansmith.spec import BuildSpec, InputShape

KEY_VERSION = 1
KEY_HEX_LENGTH = 32  # 128 bits: collision-free in practice, short enough for object paths and names

Backend = Literal["tensorrt", "onnxruntime"]


@dataclass(frozen=True)
class EngineTarget:
    """The hardware an engine is built for.

    GPU targets are identified by compute capability (the product name is kept for humans and node
    affinity but is not part of the key: GPUs of one compute capability run the same plans). CPU
    targets by architecture and the widest SIMD extension, which decides the kernels ONNX Runtime
    bakes into an optimized model (e.g. "x86_64-avx512_vnni")."""

    device: Literal["gpu", "cpu"]
    compute_capability: str | None = None
    gpu_product: str | None = None
    cpu_isa: str | None = None
    # a GPU type of a cluster whose GPUs are simulated (`plansmith build --simulated-gpu`): its engine
    # is built and run on the CPU, so it must never share a key with a real GPU's engine
    simulated: bool = False

    def __post_init__(self) -> None:
        if self.device == "gpu" and not self.compute_capability:
            raise ValueError("a GPU target needs its compute capability")
        if self.device == "cpu" and not self.cpu_isa:
            raise ValueError("a CPU target needs its ISA, e.g. x86_64-avx2")

    @property
    def portable(self) -> bool:
        """A CPU target named by architecture only (cpu:x86_64): its engine must run on any CPU of that
        architecture, so nothing tied to one CPU's SIMD extensions may be baked into it."""
        return self.device == "cpu" and "-" not in (self.cpu_isa or "")

    @property
    def name(self) -> str:
        """A short human name: 'sm90 (NVIDIA-H100-80GB-HBM3)' or 'cpu x86_64-avx2'."""
        if self.device == "cpu":
            return f"cpu {self.cpu_isa}"
        sm = "sm" + (self.compute_capability or "").replace(".", "")
        return f"{sm} ({self.gpu_product})" if self.gpu_product else sm


def target_document(target: EngineTarget, hardware_compatibility: str) -> dict[str, str]:
    """What of the target goes into the key. With hardware compatibility `ampere+` one plan runs on
    every Ampere-or-newer GPU, so the compute capability drops out of the key."""
    if target.device == "cpu":
        return {"device": "cpu", "isa": target.cpu_isa or ""}
    document = ({"device": "gpu", "hardwareCompatibility": "ampere+"} if hardware_compatibility == "ampere+"
                else {"device": "gpu", "computeCapability": target.compute_capability or ""})
    if target.simulated:
        document["simulatedOn"] = "cpu"
    return document


# ONNX Runtime's graph optimization levels, in the order of the numbers optimizationLevel maps to
OnnxRuntimeGraphLevel = Literal["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"]
ONNXRUNTIME_GRAPH_LEVELS: tuple[OnnxRuntimeGraphLevel, ...] = get_args(OnnxRuntimeGraphLevel)


def onnxruntime_graph_level(optimization_level: int, target: EngineTarget) -> int:
    """The ONNX Runtime graph optimization a build applies (an index of ONNXRUNTIME_GRAPH_LEVELS):
    optimizationLevel 0 none, 1 basic, 2 extended, 3-5 all. A portable CPU target stops at extended:
    all adds layout transformations tied to the building CPU's SIMD width (NCHWc blocks), which ONNX
    Runtime documents as valid on the same hardware only; the runtime applies them online."""
    level = min(max(optimization_level, 0), len(ONNXRUNTIME_GRAPH_LEVELS) - 1)
    return min(level, 2) if target.portable else level


def onnxruntime_precision(precision: str, target: EngineTarget) -> str:
    """The precision of the engine ONNX Runtime builds: precision is the lowest its kernels may use,
    and the CPU kernels are float32, so fp16 on a CPU target builds the float32 engine (a simulated
    GPU's engine too: it is built and run on the CPU)."""
    on_the_cpu = target.device == "cpu" or target.simulated
    return "fp32" if precision == "fp16" and on_the_cpu else precision


def effective_quantization(build: BuildSpec) -> str | None:
    """`quantization` with its documented default applied (calibrated when calibration is given)."""
    if build.precision not in ("int8", "fp8"):
        return None
    if build.quantization is not None:
        return build.quantization
    return "calibrated" if build.calibration is not None else None


def build_options(
    build: BuildSpec,
    inputs: list[InputShape],
    backend: Backend,
    target: EngineTarget,
    *,
    calibration_sha256: str | None = None,
) -> dict[str, Any]:
    """The build options that change the engine's bytes for `backend` on `target`, as canonical
    plain data.

    The calibration data enters by content (its sha256), not by URI. TensorRT-only knobs
    (workspace, hardware compatibility) are left out for ONNX Runtime, where they change nothing,
    and ONNX Runtime's precision and optimization level enter as the build applies them: specs
    that build the same engine share its key.
    """
    quantization = effective_quantization(build)
    precision, level = build.precision, build.optimization_level
    if backend == "onnxruntime":
        precision, level = onnxruntime_precision(precision, target), onnxruntime_graph_level(level, target)
    options: dict[str, Any] = {
        "precision": precision,
        "quantization": quantization,
        "optimizationLevel": level,
        "inputs": [
            {"name": s.name, "minShape": list(s.min_shape), "optShape": list(s.opt_shape), "maxShape": list(s.max_shape)}
            for s in sorted(inputs, key=lambda s: s.name)
        ],
    }
    if quantization == "calibrated":
        if not calibration_sha256:
            raise ValueError("calibrated quantization needs the calibration data's sha256 for the key")
        options["calibration"] = {"sha256": calibration_sha256, "samples": build.calibration.samples}
    if backend == "tensorrt":
        options["workspaceMiB"] = build.workspace_mi_b
        options["hardwareCompatibility"] = build.hardware_compatibility
    return options


def key_document(
    *,
    source_sha256: str,
    options: dict[str, Any],
    backend: Backend,
    backend_version: str,
    target: EngineTarget,
    hardware_compatibility: str = "none",
) -> dict[str, Any]:
    if len(source_sha256) != 64 or any(c not in "0123456789abcdef" for c in source_sha256):
        raise ValueError(f"source sha256 must be 64 lowercase hex digits, got {source_sha256!r}")
    return {
        "keyVersion": KEY_VERSION,
        "source": {"sha256": source_sha256},
        "backend": {"name": backend, "version": backend_version},
        # TensorRT's alone: an ONNX Runtime engine is keyed per compute capability (build `auto` resolves here)
        "target": target_document(target, hardware_compatibility if backend == "tensorrt" else "none"),
        "options": options,
    }


def canonical_json(document: Any) -> str:
    """Sorted keys, no whitespace, ASCII only: the same bytes for the same document everywhere."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def engine_key(
    *,
    source_sha256: str,
    build: BuildSpec,
    inputs: list[InputShape],
    backend: Backend,
    backend_version: str,
    target: EngineTarget,
    calibration_sha256: str | None = None,
) -> str:
    """The content address of the engine these inputs produce (32 lowercase hex digits)."""
    document = key_document(
        source_sha256=source_sha256,
        options=build_options(build, inputs, backend, target, calibration_sha256=calibration_sha256),
        backend=backend,
        backend_version=backend_version,
        target=target,
        hardware_compatibility=build.hardware_compatibility,
    )
    return hashlib.sha256(canonical_json(document).encode("ascii")).hexdigest()[:KEY_HEX_LENGTH]


def engine_prefix(storage_uri: str, key: str) -> str:
    """Where the engine with this key lives: <storage>/engines/<key>."""
    return storage_uri.rstrip("/") + f"/engines/{key}"


def manifest_uri(storage_uri: str, key: str) -> str:
    return engine_prefix(storage_uri, key) + "/manifest.json"


def storage_of(manifest_uri: str) -> str:
    """The storage root a manifest URI (<storage>/engines/<key>/manifest.json) is under."""
    found = re.fullmatch(r"(.+)/engines/[^/]+/manifest\.json", manifest_uri)
    if found is None:
        raise ValueError(f"{manifest_uri} is not <storage>/engines/<key>/manifest.json")
    return found.group(1)
