"""TensorRT option translation, as data (TensorRT itself cannot be installed here: GUIDE.md §3)."""

from __future__ import annotations

import pytest

from plansmith.engine_key import EngineTarget
from plansmith.manifest import TensorSpec
from plansmith.spec import BuildSpec
from plansmith_builder.backends.trt_plan import plan_trt_build
from plansmith_builder.errors import BuildError

H100 = EngineTarget(device="gpu", compute_capability="9.0", gpu_product="NVIDIA-H100-80GB-HBM3")
T4 = EngineTarget(device="gpu", compute_capability="7.5", gpu_product="Tesla-T4")
DYNAMIC = [TensorSpec(name="input", dtype="float32", shape=[-1, 3, 32, 32], min_shape=[1, 3, 32, 32],
                      opt_shape=[8, 3, 32, 32], max_shape=[32, 3, 32, 32])]
STATIC = [TensorSpec(name="input", dtype="float32", shape=[4, 3, 32, 32], min_shape=[4, 3, 32, 32],
                     opt_shape=[4, 3, 32, 32], max_shape=[4, 3, 32, 32])]


def plan(build: dict, target=H100, inputs=DYNAMIC, storage="s3://engines/prod"):
    return plan_trt_build(BuildSpec.model_validate(build), target, inputs, tensorrt_version="10.13.0.35",
                          storage_uri=storage)


@pytest.mark.parametrize("build, flags, calibrate", [
    ({"precision": "fp32"}, (), False),
    ({"precision": "fp16"}, ("FP16",), False),
    ({"precision": "bf16"}, ("BF16",), False),
    ({"precision": "int8", "calibration": {"uri": "s3://calib/c.npz"}}, ("INT8", "FP16"), True),
    ({"precision": "int8", "quantization": "explicit"}, ("INT8", "FP16"), False),
    ({"precision": "fp8", "quantization": "explicit"}, ("FP8", "FP16"), False),
])
def test_precision_becomes_builder_flags(build, flags, calibrate):
    result = plan(build)
    assert result.flags == flags
    assert result.calibrate is calibrate


def test_workspace_level_and_hardware_compatibility():
    result = plan({"workspaceMiB": 1024, "optimizationLevel": 5, "hardwareCompatibility": "ampere+"})
    assert result.workspace_bytes == 1024 * 1024 * 1024
    assert result.builder_optimization_level == 5
    assert result.hardware_compatibility_level == "AMPERE_PLUS"
    assert plan({"hardwareCompatibility": "same-compute-capability"}).hardware_compatibility_level == \
        "SAME_COMPUTE_CAPABILITY"
    assert plan({}).hardware_compatibility_level == "NONE"


def test_optimization_profile_from_shape_ranges():
    (shape,) = plan({}).profile
    assert (shape.name, shape.min, shape.opt, shape.max) == ("input", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    assert plan({}, inputs=STATIC).profile == ()  # static inputs need no profile


def test_timing_cache_lives_per_compute_capability_and_tensorrt_version():
    assert plan({}).timing_cache_uri == "s3://engines/prod/timing-caches/9.0/10.13.0.35.cache"
    assert plan({}, storage=None).timing_cache_uri is None


@pytest.mark.parametrize("build, target, reason, words", [
    ({"precision": "fp8", "calibration": {"uri": "s3://calib/c.npz"}}, H100, "UnsupportedModel", "fp8 only from explicitly"),
    ({"precision": "int8", "quantization": "dynamic"}, H100, "UnsupportedModel", "onnxruntime feature"),
    ({"precision": "fp8", "quantization": "explicit"}, T4, "UnsupportedModel", "8.9"),
    ({"precision": "bf16"}, T4, "UnsupportedModel", "bf16 needs compute capability 8.0"),
    ({"hardwareCompatibility": "ampere+"}, T4, "UnsupportedModel", "Ampere"),
    ({}, EngineTarget(device="cpu", cpu_isa="x86_64-avx2"), "BackendUnavailable", "GPU targets only"),
])
def test_impossible_combinations_are_refused_before_building(build, target, reason, words):
    with pytest.raises(BuildError) as caught:
        plan(build, target=target)
    assert caught.value.reason == reason and words in caught.value.message
