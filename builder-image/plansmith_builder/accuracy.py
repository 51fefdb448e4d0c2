"""The accuracy gate: the built engine against an FP32 ONNX Runtime run of the original model.

Both run the same inputs: the calibration data when the spec gives it, else `samples` batches
drawn (seeded) within the declared shapes and dtypes. Per output we report the lowest cosine
similarity over the batches, the largest absolute error and the largest relative error
(|engine - reference| / max(|reference|, 1e-6)), and the worst output decides the gate.

Non-finite values: where the engine holds the same non-finite value as the reference (NaN where it
has NaN, an infinity of the same sign) the two count as equal, and the figures are computed on the
finite rest; models such as log-probabilities (Log of a ReLU) or a Sqrt of the gate's own normal
inputs produce them legitimately. Any other inf or NaN (one where the reference is finite, a finite
value where the reference has one, an infinity of the other sign) fails the gate with its own message.

Computed with numpy rather than polygraphy's comparators: polygraphy's CompareFunc reports
absolute/relative error statistics but no cosine similarity (the gate's main figure), and it
wants its own RunResults wrapping; the figures here are three lines each.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from plansmith.accuracy_gate import gate_failure  # noqa: F401  (the builder's gate; the operator's too)
from plansmith.manifest import AccuracyResult, OutputAccuracy
from plansmith.spec import AccuracyGate
from plansmith_builder.calibration import batches
from plansmith_builder.modelcheck import ModelSignature

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], dict[str, np.ndarray]]

RELATIVE_FLOOR = 1e-6


def random_feeds(signature: ModelSignature, samples: int, seed: int = 0) -> list[Feeds]:
    """`samples` input batches at the optimum shape: standard normal floats, small non-negative
    integers (valid indices for any embedding), random booleans."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(samples):
        feeds = {}
        for tensor in signature.inputs:
            shape = signature.feed_shape(tensor)
            dtype = np.dtype(tensor.dtype)
            if dtype.kind == "f":
                feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                feeds[tensor.name] = rng.integers(0, 2, size=shape).astype(dtype)
            elif dtype.kind == "b":
                feeds[tensor.name] = rng.random(shape) < 0.5
            else:
                raise ValueError(f"cannot draw inputs of dtype {dtype} for {tensor.name!r}")
        result.append(feeds)
    return result


def gate_feeds(signature: ModelSignature, samples: int, calibration: dict[str, np.ndarray] | None,
               seed: int = 0) -> list[Feeds]:
    """The inputs the gate compares on: calibration batches (up to `samples` of them) or random ones."""
    if calibration is None:
        return random_feeds(signature, samples, seed)
    fixed_batch = any(t.shape[0] != -1 for t in signature.inputs)
    batch = min(signature.feed_shape(t)[0] for t in signature.inputs)
    feeds = list(batches(calibration, batch, exact=fixed_batch))[:samples]
    return feeds or random_feeds(signature, samples, seed)


def matching_non_finite(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Where both hold the same non-finite value: NaN and NaN, or infinities of the same sign.

    polygraphy's CompareFunc.simple(infinities_compare_equal=True) gives matching infinities an
    absolute difference of 0 (polygraphy/comparator/compare.py); a NaN where the reference has NaN
    is what the model computes too, so it counts as equal here as well (numpy's equal_nan=True),
    where polygraphy's elementwise check would report it as a mismatch."""
    both_nan = np.isnan(reference) & np.isnan(actual)
    same_infinity = np.isinf(reference) & (reference == actual)
    return both_nan | same_infinity


def mismatched_non_finite(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Where either holds inf or NaN and the other does not hold the same value."""
    either_non_finite = ~(np.isfinite(reference) & np.isfinite(actual))
    return either_non_finite & ~matching_non_finite(reference, actual)


def cosine(reference: np.ndarray, actual: np.ndarray) -> float:
    """Cosine similarity of two flattened tensors over the positions where both are finite
    (matching inf/NaN positions count as equal and are left out); 1.0 for two all-zero tensors,
    0.0 when one holds inf or NaN where the other does not (an engine producing them is broken)."""
    a = reference.astype(np.float64).ravel()
    b = actual.astype(np.float64).ravel()
    if np.any(mismatched_non_finite(a, b)):
        return 0.0
    finite = ~matching_non_finite(a, b)
    a, b = a[finite], b[finite]
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if norm_a == 0 and norm_b == 0:
        return 1.0
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return float(np.clip(a @ b / (norm_a * norm_b), -1.0, 1.0))


def relative_rms_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """RMS of (actual - reference) over the reference's spread (its standard deviation), or over its
    RMS where it does not vary: what cosine similarity misses, an output scaled or offset (cosine
    ignores magnitude), or a small signal on a large offset lost to rounding (fp16 at 1000 +- 0.1
    keeps a cosine of 1.0). 0.0 for equal tensors, inf for a difference from an all-zero reference."""
    error = float(np.sqrt(np.mean((actual - reference) ** 2))) if reference.size else 0.0
    if error == 0.0:
        return 0.0
    scale = float(np.std(reference)) or float(np.sqrt(np.mean(reference ** 2)))
    return error / scale if scale > 0 else float("inf")


def compare_batch(reference: np.ndarray, actual: np.ndarray) -> OutputAccuracy:
    if reference.shape != actual.shape:
        raise ValueError(f"engine output shape {list(actual.shape)} differs from the reference's {list(reference.shape)}")
    a = reference.astype(np.float64).ravel()
    b = actual.astype(np.float64).ravel()
    if np.any(mismatched_non_finite(a, b)):
        # infinite errors: gate_failure reports these as non-finite values, not as a low cosine
        return OutputAccuracy(cosine=0.0, max_abs_error=float("inf"), max_rel_error=float("inf"),
                              relative_rms_error=float("inf"))
    finite = ~matching_non_finite(a, b)  # the matching inf/NaN positions are equal: no error there
    a, b = a[finite], b[finite]
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.abs(a), RELATIVE_FLOOR)
    return OutputAccuracy(cosine=cosine(a, b), max_abs_error=float(diff.max(initial=0.0)),
                          max_rel_error=float(rel.max(initial=0.0)), relative_rms_error=relative_rms_error(a, b))


def worst(items: Iterable[OutputAccuracy]) -> OutputAccuracy:
    items = list(items)
    return OutputAccuracy(cosine=min(i.cosine for i in items), max_abs_error=max(i.max_abs_error for i in items),
                          max_rel_error=max(i.max_rel_error for i in items),
                          relative_rms_error=max(i.relative_rms_error or 0.0 for i in items))


def measure(reference: Runner, engine: Runner, feeds: list[Feeds], gate: AccuracyGate) -> AccuracyResult:
    """Run both on every batch and summarise per output and overall."""
    per_output: dict[str, list[OutputAccuracy]] = {}
    for batch in feeds:
        expected = reference(batch)
        actual = engine(batch)
        for name, value in expected.items():
            if name not in actual:
                raise ValueError(f"the engine has no output {name!r}")
            per_output.setdefault(name, []).append(compare_batch(np.asarray(value), np.asarray(actual[name])))
    summary = {name: worst(values) for name, values in per_output.items()}
    overall = worst(summary.values())
    return AccuracyResult(
        cosine=overall.cosine, max_abs_error=overall.max_abs_error, max_rel_error=overall.max_rel_error,
        relative_rms_error=overall.relative_rms_error, samples=len(feeds), per_output=summary,
        min_cosine=gate.min_cosine, max_abs_error_allowed=gate.max_abs_error,
        max_relative_rms_error_allowed=gate.max_relative_rms_error,
    )
