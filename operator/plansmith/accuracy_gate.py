"""The accuracy gate: whether an engine's measured accuracy (a manifest's `accuracy`) passes a
spec's `build.accuracy`. The builder applies it to what it measured; the operator to an engine
it finds in storage, built under another gate (a model sharing its key)."""

from __future__ import annotations

import math

from plansmith.manifest import AccuracyResult
from plansmith.spec import AccuracyGate


def gate_failure(result: AccuracyResult, gate: AccuracyGate) -> str | None:
    """Why `result` fails `gate` (naming the worst output), or None when it passes."""
    problems = []
    for name, figures in sorted(result.per_output.items()):
        if not math.isfinite(figures.max_abs_error):  # compare_batch's mark of mismatched inf/NaN
            problems.append(f"output {name!r} has inf or NaN values that differ from the FP32 reference's (inf or NaN "
                            f"where the reference is finite, a finite value where it holds inf or NaN, or an "
                            f"infinity of the other sign)")
            continue
        if not figures.cosine >= gate.min_cosine:
            problems.append(f"output {name!r} cosine {figures.cosine:.6f} < minCosine {gate.min_cosine}")
        if gate.max_abs_error is not None and not figures.max_abs_error <= gate.max_abs_error:
            problems.append(f"output {name!r} max abs error {figures.max_abs_error:.6g} > maxAbsError {gate.max_abs_error}")
        # a manifest older than the figure has none: it is checked where it was measured
        if (gate.max_relative_rms_error is not None and figures.relative_rms_error is not None
                and not figures.relative_rms_error <= gate.max_relative_rms_error):
            problems.append(f"output {name!r} relative RMS error {figures.relative_rms_error:.6g} > "
                            f"maxRelativeRmsError {gate.max_relative_rms_error} (the engine's outputs are off in "
                            f"scale or offset, or lost the reference's variation)")
    if not result.per_output and not result.cosine >= gate.min_cosine:
        problems.append(f"cosine {result.cosine:.6f} < minCosine {gate.min_cosine}")
    return "; ".join(problems) or None
