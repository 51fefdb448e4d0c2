"""The ONNX Runtime executor: provider choice, and a real session behind the executor interface."""

import numpy as np

from plansmith_runtime.executors import create_executor
from plansmith_runtime.executors.onnxruntime import providers_for, uses_io_binding
from plansmith_runtime.loader import fetch_engine


def test_cuda_engines_use_cuda_with_cpu_fallback_and_io_binding():
    providers = providers_for("CUDAExecutionProvider", device_id=1)
    assert providers == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
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
