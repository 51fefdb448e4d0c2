"""The engine key: stable across processes, changed by what changes the plan, and only by that."""

from __future__ import annotations

import subprocess
import sys

import pytest

from plansmith.engine_key import EngineTarget, build_options, engine_key, manifest_uri
from plansmith.spec import BuildSpec, InferenceModelSpec, InputShape

SHA = "ab" * 32
H100 = EngineTarget(device="gpu", compute_capability="9.0", gpu_product="NVIDIA-H100-80GB-HBM3")
INPUTS = [InputShape(name="input", min_shape=[1, 3, 32, 32], opt_shape=[8, 3, 32, 32], max_shape=[32, 3, 32, 32])]


def key(build: dict | None = None, *, inputs=INPUTS, backend="tensorrt", version="10.13.0", target=H100,
        source=SHA, calibration=None) -> str:
    return engine_key(source_sha256=source, build=BuildSpec.model_validate(build or {}), inputs=inputs,
                      backend=backend, backend_version=version, target=target, calibration_sha256=calibration)


def test_same_inputs_same_key_and_its_shape():
    assert key() == key()
    assert len(key()) == 32 and all(c in "0123456789abcdef" for c in key())


def test_stable_across_processes():
    """No hash randomisation, dict order or floats leak into the key."""
    code = ("from plansmith.engine_key import EngineTarget, engine_key; from plansmith.spec import BuildSpec, InputShape;"
            f"print(engine_key(source_sha256={SHA!r}, build=BuildSpec(), inputs=[InputShape(name='input', "
            "min_shape=[1,3,32,32], opt_shape=[8,3,32,32], max_shape=[32,3,32,32])], backend='tensorrt', "
            "backend_version='10.13.0', target=EngineTarget(device='gpu', compute_capability='9.0')))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outputs == {key()}


@pytest.mark.parametrize("change", [
    dict(build={"precision": "fp32"}),
    dict(build={"optimizationLevel": 5}),
    dict(build={"workspaceMiB": 1024}),
    dict(build={"hardwareCompatibility": "same-compute-capability"}),
    dict(version="10.14.0"),
    dict(backend="onnxruntime"),
    dict(source="cd" * 32),
    dict(target=EngineTarget(device="gpu", compute_capability="8.0")),
    dict(inputs=[InputShape(name="input", min_shape=[1, 3, 32, 32], opt_shape=[8, 3, 32, 32], max_shape=[64, 3, 32, 32])]),
])
def test_relevant_changes_give_a_new_key(change):
    assert key(**change) != key()


def test_calibration_data_enters_by_content():
    build = {"precision": "int8", "calibration": {"uri": "s3://data/calib.npz"}}
    moved = {"precision": "int8", "calibration": {"uri": "s3://elsewhere/calib.npz"}}
    assert key(build, calibration="11" * 32) == key(moved, calibration="11" * 32)
    assert key(build, calibration="11" * 32) != key(build, calibration="22" * 32)
    with pytest.raises(ValueError):
        key(build)  # calibrated int8 without the data's sha256 cannot be keyed


def test_irrelevant_changes_keep_the_key():
    # the gate, the deadline, the product name (same compute capability), serving and the model's URI
    assert key({"accuracy": {"minCosine": 0.5}, "timeoutSeconds": 60}) == key()
    assert key(target=EngineTarget(device="gpu", compute_capability="9.0", gpu_product="NVIDIA-H100-PCIe")) == key()
    one = InferenceModelSpec.model_validate({"model": {"uri": "s3://models/a.onnx"}, "serving": {"replicas": 1}})
    two = InferenceModelSpec.model_validate({"model": {"uri": "s3://models/b.onnx"}, "serving": {"replicas": 9}})
    assert (build_options(one.build, one.model.inputs, "tensorrt", H100)
            == build_options(two.build, two.model.inputs, "tensorrt", H100))


CPU_AVX2 = EngineTarget(device="cpu", cpu_isa="x86_64-avx2")
CPU_PORTABLE = EngineTarget(device="cpu", cpu_isa="x86_64")
SIMULATED_H100 = EngineTarget(device="gpu", compute_capability="9.0", simulated=True)


@pytest.mark.parametrize("same, as_this, target", [
    # ONNX Runtime's CPU kernels are float32: fp16 on a CPU target builds the fp32 engine
    ({"precision": "fp16"}, {"precision": "fp32"}, CPU_AVX2),
    ({"precision": "fp16"}, {"precision": "fp32"}, SIMULATED_H100),  # built and run on the CPU
    # its levels 3-5 are all ORT_ENABLE_ALL
    ({"optimizationLevel": 5}, {"optimizationLevel": 3}, CPU_AVX2),
    ({"optimizationLevel": 4}, {"optimizationLevel": 3}, H100),
    # a portable CPU target stops at ORT_ENABLE_EXTENDED
    ({"optimizationLevel": 3}, {"optimizationLevel": 2}, CPU_PORTABLE),
])
def test_onnxruntime_specs_that_build_one_engine_share_its_key(same, as_this, target):
    assert key(same, backend="onnxruntime", target=target) == key(as_this, backend="onnxruntime", target=target)


@pytest.mark.parametrize("one, other, target", [
    ({"precision": "fp16"}, {"precision": "fp32"}, H100),  # converted to float16 for CUDA
    ({"optimizationLevel": 3}, {"optimizationLevel": 2}, CPU_AVX2),
    ({"optimizationLevel": 1}, {"optimizationLevel": 0}, CPU_PORTABLE),  # simplified, and basic
])
def test_onnxruntime_specs_that_build_different_engines_keep_their_keys(one, other, target):
    assert key(one, backend="onnxruntime", target=target) != key(other, backend="onnxruntime", target=target)


def test_tensorrt_keeps_every_level_and_precision():
    assert key({"optimizationLevel": 4}) != key({"optimizationLevel": 3}) != key({"optimizationLevel": 5})
    assert key({"precision": "fp16"}) != key({"precision": "fp32"})


def test_ampere_plus_drops_the_compute_capability():
    a100 = EngineTarget(device="gpu", compute_capability="8.0")
    assert key({"hardwareCompatibility": "ampere+"}) == key({"hardwareCompatibility": "ampere+"}, target=a100)
    # TensorRT's alone: an ONNX Runtime engine (backend auto on its builder) stays keyed per compute capability
    ampere_plus = {"hardwareCompatibility": "ampere+"}
    assert key(ampere_plus, backend="onnxruntime") != key(ampere_plus, backend="onnxruntime", target=a100)
    assert key(ampere_plus, backend="onnxruntime") == key(backend="onnxruntime")


def test_onnxruntime_ignores_tensorrt_only_knobs_and_keys_cpu_isa():
    cpu = EngineTarget(device="cpu", cpu_isa="x86_64-avx2")
    assert key({"workspaceMiB": 64}, backend="onnxruntime", target=cpu) == key(backend="onnxruntime", target=cpu)
    assert key(backend="onnxruntime", target=cpu) != key(
        backend="onnxruntime", target=EngineTarget(device="cpu", cpu_isa="x86_64-avx512_vnni"))


def test_manifest_location():
    assert manifest_uri("s3://engines/prod/", "k1") == "s3://engines/prod/engines/k1/manifest.json"


def test_the_storage_root_of_a_manifest_uri():
    from plansmith.engine_key import manifest_uri, storage_of

    for storage in ("s3://engines/prod", "file:///var/engines"):
        assert storage_of(manifest_uri(storage, "k" * 32)) == storage
    with pytest.raises(ValueError, match="is not <storage>/engines/<key>/manifest.json"):
        storage_of("s3://engines/prod/k/manifest.json")
