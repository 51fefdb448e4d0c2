"""The ONNX Runtime backend's CUDA path, where it can be checked without a GPU: ONNX Runtime falls
back to the CPU with only a log line when the CUDA provider cannot load (seen with onnxruntime-gpu
whose CUDA libraries were not found), and the builder must refuse that rather than build, gate and
time a GPU engine on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from plansmith import testmodels
from plansmith_builder.backends import ort_backend
from plansmith_builder.errors import BuildError


class FallbackSession:
    """What onnxruntime.InferenceSession gives when the CUDA provider failed to load."""

    def __init__(self, path, options=None, providers=None):
        self.asked = providers

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_a_gpu_build_whose_session_fell_back_to_the_cpu_is_backend_unavailable(tmp_path, monkeypatch):
    import onnxruntime

    model = testmodels.mlp(tmp_path / "mlp.onnx")
    monkeypatch.setattr(onnxruntime, "InferenceSession", FallbackSession)
    with pytest.raises(BuildError) as raised:
        ort_backend.session(model.path, "CUDAExecutionProvider")
    assert raised.value.reason == "BackendUnavailable"
    assert "CUDAExecutionProvider is not active" in raised.value.message


def test_a_cpu_session_is_accepted_and_runs(tmp_path):
    model = testmodels.mlp(tmp_path / "mlp.onnx")
    sess = ort_backend.session(model.path, "CPUExecutionProvider")
    feeds = model.sample_inputs(batch=2, seed=1)
    outputs = ort_backend.runner(sess)(feeds)
    assert set(outputs) == {o.name for o in sess.get_outputs()}
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


def test_the_reference_is_timed_on_the_engines_own_device():
    from plansmith_builder.benchmark import reference_timing_provider

    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert reference_timing_provider(cpu, [cpu]) == cpu
    assert reference_timing_provider(cuda, [cuda, cpu]) == cuda  # not a CPU run at the max batch
    assert reference_timing_provider(None, [cuda, cpu]) == cuda  # TensorRT engines: ORT's CUDA provider
    assert reference_timing_provider(None, [cpu]) is None  # no FP32 run on that GPU here: not timed
