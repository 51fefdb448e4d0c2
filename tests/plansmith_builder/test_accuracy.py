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
