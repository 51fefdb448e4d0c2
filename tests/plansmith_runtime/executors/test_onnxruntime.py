"""The ONNX Runtime executor: provider choice, and a real session behind the executor interface."""

import numpy as np
import pytest

from plansmith_runtime.executors import create_executor
from plansmith_runtime.executors.onnxruntime import is_device_value, providers_for, uses_io_binding
from plansmith_runtime.loader import fetch_engine


def test_cuda_engines_use_cuda_with_cpu_fallback_and_io_binding():
    providers = providers_for("CUDAExecutionProvider", device_id=1)
    assert providers == [("CUDAExecutionProvider", {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC",
                                                    "prefer_nhwc": "1"}), "CPUExecutionProvider"]
    assert uses_io_binding(providers)
    assert providers_for("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert not uses_io_binding(providers_for(None))


def test_executor_runs_the_builders_engine_like_onnxruntime(engines, tmp_path):
    built = engines["mlp"]
    engine = fetch_engine(built.manifest_uri, tmp_path / "engine")
    executor = create_executor(engine, intra_op_threads=1)
    x = built.model.sample_inputs(batch=5, seed=2)["input"]
    outputs = executor.run({"input": x})
    np.testing.assert_allclose(outputs["logits"], built.session().run(None, {"input": x})[0], rtol=1e-6, atol=1e-6)
    executor.close()


def test_executor_takes_ortvalues_and_binds_io(engines, tmp_path):
    """OrtValues (inputs already on the session's device) give the same answer as numpy arrays,
    through session.run and through the IO-binding path the GPU uses (exercised here on the CPU)."""
    import onnxruntime as ort

    built = engines["small_cnn"]
    executor = create_executor(fetch_engine(built.manifest_uri, tmp_path / "engine"), intra_op_threads=1)
    x = built.model.sample_inputs(batch=3, seed=4)["input"]
    expected = built.session().run(None, {"input": x})[0]
    value = ort.OrtValue.ortvalue_from_numpy(x, "cpu", 0)
    assert is_device_value(value) and not is_device_value(x)
    np.testing.assert_allclose(executor.run({"input": value})["logits"], expected, rtol=1e-5, atol=1e-5)
    executor.io_binding = True
    for feed in (x, value):
        outputs = executor.run({"input": feed})
        assert isinstance(outputs["logits"], np.ndarray)
        np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
    executor.close()


class FallbackSession:
    """What onnxruntime.InferenceSession gives when the CUDA provider could not load."""

    def __init__(self, path, options=None, providers=None):
        self.asked = providers

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_a_cuda_engine_whose_session_fell_back_to_the_cpu_is_refused(engines, tmp_path, monkeypatch):
    import dataclasses

    import onnxruntime

    from plansmith_runtime.executors import ExecutorError

    loaded = fetch_engine(engines["small_cnn"].manifest_uri, tmp_path / "engine")
    manifest = loaded.manifest.model_copy(update={"target": loaded.manifest.target.model_copy(
        update={"execution_provider": "CUDAExecutionProvider"})})
    monkeypatch.setattr(onnxruntime, "InferenceSession", FallbackSession)
    with pytest.raises(ExecutorError, match="CUDAExecutionProvider is not active"):
        create_executor(dataclasses.replace(loaded, manifest=manifest))
