"""What the TensorRT backend will configure, as plain data (tested without TensorRT installed).

`plan_trt_build` translates the spec into a `TensorRTPlan`; `trt_backend` applies it to a real
`tensorrt.IBuilderConfig`. Names are TensorRT 10 Python API enum member names:

    precision fp32  no precision flag (TF32 stays TensorRT's default)
    precision fp16  BuilderFlag.FP16
    precision bf16  BuilderFlag.BF16
    precision int8  BuilderFlag.INT8 + FP16 (layers without int8 kernels fall back to fp16):
                    calibrated -> an entropy calibrator over the calibration data, with the
                    optimization profile as the calibration profile; explicit -> the Q/DQ model's scales
    precision fp8   BuilderFlag.FP8 + FP16, explicit Q/DQ models only (TensorRT has no fp8 calibrator)
    workspaceMiB    set_memory_pool_limit(MemoryPoolType.WORKSPACE, MiB << 20)
    optimizationLevel  builder_optimization_level (0-5)
    hardwareCompatibility  none -> NONE, ampere+ -> AMPERE_PLUS, same-compute-capability -> SAME_COMPUTE_CAPABILITY
    model.inputs    one optimization profile: set_shape(name, min, opt, max) per input
    timing cache    <storage>/timing-caches/<compute capability>/<TensorRT version>.cache, loaded before
                    and saved after the build (a cache only helps the GPU and TensorRT that wrote it)
"""

from __future__ import annotations

from dataclasses import dataclass

from plansmith.engine_key import EngineTarget, effective_quantization
from plansmith.manifest import TensorSpec
from plansmith.spec import BuildSpec
from plansmith.storage import join
from plansmith_builder.errors import BuildError

HARDWARE_COMPATIBILITY = {
    "none": "NONE",
    "ampere+": "AMPERE_PLUS",
    "same-compute-capability": "SAME_COMPUTE_CAPABILITY",
}
AMPERE_COMPUTE_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class ProfileShape:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class TensorRTPlan:
    flags: tuple[str, ...]  # BuilderFlag member names
    workspace_bytes: int
    builder_optimization_level: int
    hardware_compatibility_level: str  # HardwareCompatibilityLevel member name
    profile: tuple[ProfileShape, ...]  # empty: all inputs static
    calibrate: bool  # run the int8 entropy calibrator over the calibration data
    timing_cache_uri: str | None
    effective_precision: str


def precision_flags(build: BuildSpec) -> tuple[tuple[str, ...], bool]:
    """(BuilderFlag names, needs a calibrator) for the spec's precision and quantization."""
    precision = build.precision
    quantization = effective_quantization(build)
    if precision == "fp32":
        return (), False
    if precision == "fp16":
        return ("FP16",), False
    if precision == "bf16":
        return ("BF16",), False
    if precision == "int8":
        if quantization == "dynamic":
            raise BuildError("UnsupportedModel", "quantization: dynamic is an onnxruntime feature; TensorRT needs "
                                                 "calibrated or explicit (Q/DQ) int8")
        if quantization not in ("calibrated", "explicit"):
            raise BuildError("InvalidSpec", "int8 needs spec.build.calibration or quantization: explicit")
        return ("INT8", "FP16"), quantization == "calibrated"
    if precision == "fp8":
        if quantization != "explicit":
            raise BuildError("UnsupportedModel", "TensorRT builds fp8 only from explicitly quantized models "
                                                 "(quantization: explicit, e.g. exported with nvidia-modelopt); "
                                                 "it has no fp8 calibrator")
        return ("FP8", "FP16"), False
    raise BuildError("InvalidSpec", f"unknown precision {precision!r}")


def optimization_profile(inputs: list[TensorSpec]) -> tuple[ProfileShape, ...]:
    """One profile covering every input; empty when every input is static (TensorRT needs none)."""
    if all(-1 not in t.shape for t in inputs):
        return ()
    return tuple(ProfileShape(t.name, tuple(t.min_shape or t.shape), tuple(t.opt_shape or t.shape),
                              tuple(t.max_shape or t.shape)) for t in inputs)


def timing_cache_uri(storage_uri: str | None, target: EngineTarget, tensorrt_version: str) -> str | None:
    if not storage_uri or not target.compute_capability:
        return None
    return join(storage_uri, "timing-caches", target.compute_capability, f"{tensorrt_version}.cache")


def _compute_capability(value: str) -> tuple[int, int]:
    major, _, minor = value.partition(".")
    return int(major), int(minor or 0)


def plan_trt_build(build: BuildSpec, target: EngineTarget, inputs: list[TensorSpec], *,
                   tensorrt_version: str, storage_uri: str | None) -> TensorRTPlan:
    if target.device != "gpu" or not target.compute_capability:
        raise BuildError("BackendUnavailable", f"TensorRT builds for GPU targets only, not {target.name}")
    flags, calibrate = precision_flags(build)
    if build.hardware_compatibility == "ampere+" and _compute_capability(target.compute_capability) < AMPERE_COMPUTE_CAPABILITY:
        raise BuildError("UnsupportedModel", f"hardwareCompatibility ampere+ needs an Ampere or newer GPU to build on "
                                             f"(compute capability >= 8.0), the target has {target.compute_capability}")
    if "FP8" in flags and _compute_capability(target.compute_capability) < (8, 9):
        raise BuildError("UnsupportedModel", f"fp8 needs compute capability 8.9 or newer, the target has "
                                             f"{target.compute_capability}")
    if "BF16" in flags and _compute_capability(target.compute_capability) < AMPERE_COMPUTE_CAPABILITY:
        raise BuildError("UnsupportedModel", f"bf16 needs compute capability 8.0 or newer, the target has "
                                             f"{target.compute_capability}")
    return TensorRTPlan(
        flags=flags,
        workspace_bytes=build.workspace_mi_b << 20,
        builder_optimization_level=build.optimization_level,
        hardware_compatibility_level=HARDWARE_COMPATIBILITY[build.hardware_compatibility],
        profile=optimization_profile(inputs),
        calibrate=calibrate,
        timing_cache_uri=timing_cache_uri(storage_uri, target, tensorrt_version),
        effective_precision=build.precision,
    )
