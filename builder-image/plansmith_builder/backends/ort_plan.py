"""What the ONNX Runtime backend will do for a build spec and target: pure decisions, no I/O.

    precision fp32  optimize only
    precision fp16  GPU (CUDA EP): convert to float16 with onnxconverter-common, float32 inputs/outputs
                    kept; CPU: precision is the *lowest* precision kernels may use, and ONNX Runtime's
                    CPU kernels are float32, so the engine stays float32 (fp16 on CPU only adds casts)
    precision int8  calibrated: static QDQ quantization (per-channel int8 weights, uint8 activations)
                    dynamic: int8 weights, activation scales computed at run time (quantize_dynamic)
                    explicit: the model already has QuantizeLinear/DequantizeLinear nodes
    bf16, fp8       not supported by this backend (UnsupportedModel); use TensorRT

optimizationLevel maps to ONNX Runtime's graph optimization level: 0 none, 1 basic, 2 extended,
3-5 all (all includes layout transformations tied to the CPU's ISA, which is why the ISA is in the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plansmith.engine_key import (ONNXRUNTIME_GRAPH_LEVELS, EngineTarget, OnnxRuntimeGraphLevel,
                                  effective_quantization, onnxruntime_graph_level, onnxruntime_precision)
from plansmith.onnxruntime_providers import CPU_PROVIDER, CUDA_PROVIDER
from plansmith.spec import BuildSpec
from plansmith_builder.errors import BuildError


@dataclass(frozen=True)
class OrtPlan:
    execution_provider: str
    graph_level: OnnxRuntimeGraphLevel
    simplify: bool  # onnxslim simplification / constant folding first
    convert_fp16: bool
    quantize: Literal["static", "dynamic", "explicit"] | None
    effective_precision: str
    note: str | None = None


def plan_ort_build(build: BuildSpec, target: EngineTarget) -> OrtPlan:
    gpu = target.device == "gpu"
    provider = CUDA_PROVIDER if gpu else CPU_PROVIDER
    # the key's own reading of the level (plansmith.engine_key), so that one engine has one key
    level = ONNXRUNTIME_GRAPH_LEVELS[onnxruntime_graph_level(build.optimization_level, target)]
    simplify = build.optimization_level > 0
    precision = build.precision
    if precision in ("bf16", "fp8"):
        raise BuildError("UnsupportedModel", f"precision {precision} is not supported by the onnxruntime backend "
                                             "(use fp32, fp16 or int8, or backend tensorrt on a GPU)")
    if precision == "fp32":
        return OrtPlan(provider, level, simplify, False, None, "fp32")
    if precision == "fp16":
        if onnxruntime_precision(precision, target) == "fp16":
            return OrtPlan(provider, level, simplify, True, None, "fp16")
        return OrtPlan(provider, level, simplify, False, None, "fp32",
                       note="fp16 on a CPU target: ONNX Runtime's CPU kernels are float32, the engine stays float32")
    quantization = effective_quantization(build)
    if gpu and quantization != "explicit":
        raise BuildError("UnsupportedModel", "int8 with the onnxruntime backend on a GPU target needs an explicitly "
                                             "quantized model (quantization: explicit); use backend tensorrt for "
                                             "calibrated int8 on GPUs")
    if quantization == "calibrated":
        return OrtPlan(provider, level, simplify, False, "static", "int8")
    if quantization == "dynamic":
        return OrtPlan(provider, level, simplify, False, "dynamic", "int8")
    if quantization == "explicit":
        return OrtPlan(provider, level, simplify, False, "explicit", "int8")
    raise BuildError("InvalidSpec", "int8 needs spec.build.calibration or quantization: dynamic or explicit")
