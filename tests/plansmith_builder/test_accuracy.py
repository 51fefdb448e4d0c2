"""The accuracy figures and the gate's verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from plansmith.spec import AccuracyGate
from plansmith_builder.accuracy import compare_batch, cosine, gate_failure, measure


def test_cosine_of_known_vectors():
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    assert cosine(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0, abs=1e-12)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine(np.array([1.0, 2.0]), np.array([np.nan, 1.0])) == 0.0  # NaN from an engine is a failure


def test_errors_are_absolute_and_relative():
    figures = compare_batch(np.array([1.0, -2.0, 4.0]), np.array([1.5, -2.0, 4.0]))
    assert figures.max_abs_error == 0.5 and figures.max_rel_error == 0.5


@pytest.mark.parametrize("case, reference, engine", [
    # fp16 (resolution 0.5 at 1000) rounds a regression head at 1000 +- 0.1 to 1000.0: the signal is gone
    ("a small signal on a large offset lost to fp16", lambda x: 1000.0 + 0.1 * np.tanh(x.sum(axis=1, keepdims=True)),
     lambda y: y.astype(np.float16).astype(np.float64)),
    ("every value 3x too large", lambda x: x @ np.ones((16, 4)), lambda y: 3 * y),
    ("a constant output answered with another constant", lambda x: np.full((x.shape[0], 1), 0.2),
     lambda y: np.full_like(y, 0.9)),
])
def test_the_default_gate_refuses_outputs_cosine_cannot_tell_apart(case, reference, engine):
    """Cosine similarity is 1.0 for each of these engines; the relative RMS error (over the
    reference's spread) is not, and the default gate refuses them."""
    gate = AccuracyGate()  # what a spec gets by default
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((8, 16))} for _ in range(4)]
    result = measure(lambda f: {"y": reference(f["x"])}, lambda f: {"y": engine(reference(f["x"]))}, feeds, gate)
    assert result.cosine > 0.9999, case  # the gate's old figure saw nothing wrong
    assert result.relative_rms_error > 0.9
    assert "relative RMS error" in gate_failure(result, gate) and "maxRelativeRmsError 0.5" in gate_failure(result, gate)


def test_the_relative_rms_error_of_a_close_engine_is_small_and_passes():
    reference, engine, feeds = run_pair(0.01)
    result = measure(reference, engine, feeds, AccuracyGate())
    assert 0 < result.relative_rms_error < 0.01 and gate_failure(result, AccuracyGate()) is None
    assert compare_batch(np.zeros(3), np.zeros(3)).relative_rms_error == 0.0
    assert compare_batch(np.zeros(3), np.ones(3)).relative_rms_error == float("inf")
    unchecked = AccuracyGate(max_relative_rms_error=None)
    assert gate_failure(measure(lambda f: {"y": f["x"]}, lambda f: {"y": 3 * f["x"]}, feeds, unchecked), unchecked) is None


def run_pair(noise: float):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 4))

    def reference(feeds):
        return {"y": feeds["x"] @ weights}

    def engine(feeds):
        exact = feeds["x"] @ weights
        return {"y": exact + noise * np.random.default_rng(1).standard_normal(exact.shape)}

    feeds = [{"x": rng.standard_normal((2, 8))} for _ in range(3)]
    return reference, engine, feeds


def test_close_engine_passes_and_broken_engine_fails_naming_the_output():
    gate = AccuracyGate(min_cosine=0.99, max_abs_error=0.1)
    reference, engine, feeds = run_pair(0.001)
    good = measure(reference, engine, feeds, gate)
    assert good.samples == 3 and good.cosine > 0.999 and gate_failure(good, gate) is None

    reference, engine, feeds = run_pair(1.0)
    bad = measure(reference, engine, feeds, gate)
    failure = gate_failure(bad, gate)
    assert "output 'y' cosine" in failure and "maxAbsError 0.1" in failure
    assert bad.per_output["y"].cosine == bad.cosine < 0.99


# ---- inf and NaN: matching non-finite values are equal, any other one fails the gate

INF, NAN = float("inf"), float("nan")


def log_relu_model(path):
    """A real ONNX model whose FP32 output holds -inf wherever the input is <= 0: Log(Relu(x))."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("logp", TensorProto.FLOAT, ["batch", 16])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Log", ["r"], ["logp"])],
                              "log_relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_matching_infinities_and_nans_count_as_equal():
    reference = np.array([-INF, 1.0, NAN, INF, 2.0])
    figures = compare_batch(reference, reference.copy())
    assert figures.cosine == pytest.approx(1.0) and figures.max_abs_error == figures.max_rel_error == 0.0
    # the figures come from the finite rest
    figures = compare_batch(reference, np.array([-INF, 1.5, NAN, INF, 2.0]))
    assert figures.max_abs_error == 0.5 and figures.max_rel_error == 0.5 and 0.9 < figures.cosine < 1.0


@pytest.mark.parametrize("engine", [
    [-INF, 1.0, NAN, INF, INF],    # inf where the reference is finite
    [-INF, 1.0, NAN, INF, NAN],    # NaN where the reference is finite
    [-5.0, 1.0, NAN, INF, 2.0],    # finite where the reference holds -inf
    [-INF, 1.0, 0.0, INF, 2.0],    # finite where the reference holds NaN
    [INF, 1.0, NAN, INF, 2.0],     # the other infinity
])
def test_mismatched_inf_or_nan_fails_the_gate_saying_so(engine):
    reference = np.array([-INF, 1.0, NAN, INF, 2.0])
    gate = AccuracyGate(min_cosine=0.5)
    result = measure(lambda feeds: {"y": reference}, lambda feeds: {"y": np.array(engine)}, [{}], gate)
    failure = gate_failure(result, gate)
    assert failure is not None and "output 'y' has inf or NaN values that differ from the FP32 reference" in failure
    assert "cosine" not in failure


def test_engine_that_reproduces_minus_inf_outputs_is_built(tmp_path, cli, write_yaml):
    """Log(Relu(x)) on the gate's standard-normal inputs: about half the outputs are -inf, and the fp32
    ONNX Runtime engine computes exactly those; it passes the gate and its figures are finite."""
    from plansmith.manifest import parse_manifest

    model = log_relu_model(tmp_path / "log_relu.onnx")
    store = tmp_path / "store"
    inputs = [{"name": "input", "minShape": [1, 16], "optShape": [8, 16], "maxShape": [8, 16]}]
    run = cli(str(write_yaml(tmp_path / "m.yaml", model.as_uri(), inputs=inputs, build={"precision": "fp32"},
                             storage_uri=store.as_uri())), "--backend", "onnxruntime")
    assert run.exit_code == 0 and run.result["status"] == "built", run.result
    manifest = parse_manifest((store / "engines" / run.result["key"] / "manifest.json").read_bytes())
    assert manifest.accuracy.per_output["logp"].cosine == pytest.approx(1.0)
    assert manifest.accuracy.max_abs_error == 0.0
