"""What the ONNX Runtime backend does for each precision and target."""

from __future__ import annotations

import pytest

from plansmith.engine_key import EngineTarget
from plansmith.spec import BuildSpec
from plansmith_builder.backends.ort_plan import plan_ort_build
from plansmith_builder.errors import BuildError

CPU = EngineTarget(device="cpu", cpu_isa="x86_64-avx2")
GPU = EngineTarget(device="gpu", compute_capability="9.0")


def plan(build: dict, target=CPU):
    return plan_ort_build(BuildSpec.model_validate(build), target)


def test_optimization_levels_map_to_ort_graph_levels():
    assert [plan({"optimizationLevel": n}).graph_level for n in range(6)] == [
        "ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL", "ORT_ENABLE_ALL", "ORT_ENABLE_ALL"]
    assert plan({"optimizationLevel": 0}).simplify is False
    assert plan({"optimizationLevel": 3}).simplify is True


def test_cpu_targets():
    assert plan({"precision": "fp32"}).execution_provider == "CPUExecutionProvider"
    fp16 = plan({"precision": "fp16"})
    assert (fp16.convert_fp16, fp16.effective_precision) == (False, "fp32") and "float32" in fp16.note
    assert plan({"precision": "int8", "calibration": {"uri": "s3://calib/c.npz"}}).quantize == "static"
    assert plan({"precision": "int8", "quantization": "dynamic"}).quantize == "dynamic"
    assert plan({"precision": "int8", "quantization": "explicit"}).quantize == "explicit"


def test_gpu_targets_use_cuda_and_convert_to_fp16():
    result = plan({"precision": "fp16"}, GPU)
    assert result.execution_provider == "CUDAExecutionProvider"
    assert result.convert_fp16 and result.effective_precision == "fp16"


@pytest.mark.parametrize("build, target", [
    ({"precision": "bf16"}, CPU),
    ({"precision": "fp8", "quantization": "explicit"}, CPU),
    ({"precision": "int8", "quantization": "dynamic"}, GPU),
])
def test_unsupported_precisions_are_refused(build, target):
    with pytest.raises(BuildError) as caught:
        plan(build, target)
    assert caught.value.reason == "UnsupportedModel"
