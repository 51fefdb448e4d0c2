"""Engine builder benchmark on this CPU: optimized engines against the original FP32 model.

    .venv/bin/python bench/build.py [--threads 1] [--rounds 5] [--seconds 0.5]

For each generated model (plansmith.testmodels) and precision, the real builder (`run_build`,
ONNX Runtime backend, file:// store in a temporary folder) builds the engine with its accuracy
gate; then the engine and the original model are timed side by side, in the same process,
in many short interleaved slices, with the same thread count. The machine is shared, so speed-ups
are paired: in each cycle an engine's throughput is divided by the baseline's from the same cycle,
and the median of those ratios is reported, with their range (min-max) to show the noise.

- "ort-default": the original FP32 model in an ONNX Runtime session with default options
  (graph optimizations at ORT_ENABLE_ALL applied at load time) - what a user gets with no builder;
- "unoptimized": the original FP32 model with graph optimizations disabled (ORT_DISABLE_ALL).

Reported: p50 latency at batch 1, throughput (items/s) at the max batch (32), the ratios, and the
gate's cosine. Targets (issue 3): >= 1.5x throughput for the CNN with int8, and for the transformer
block with the best precision the gate accepts (cosine >= 0.99). The target column compares
against ort-default, the stricter baseline; the unoptimized ratio is printed next to it.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path


from plansmith import testmodels
from plansmith.manifest import parse_manifest
from plansmith.spec import InferenceModelSpec
from plansmith_builder.benchmark import BenchmarkBudget
from plansmith_builder.build import BuildRequest, run_build

TARGET_RATIO = 1.5
MIN_COSINE = 0.99

# model -> (precision candidates, whether the 1.5x target applies to the best accepted one)
CANDIDATES = {
    "small_cnn": ([{"precision": "int8", "calibration": True}, {"precision": "fp32"}], "int8"),
    "transformer_block": ([{"precision": "int8", "quantization": "dynamic"},
                           {"precision": "int8", "calibration": True}, {"precision": "fp32"}], "best"),
    "mlp": ([{"precision": "int8", "quantization": "dynamic"}, {"precision": "fp32"}], None),
}


def session(path: Path, threads: int, optimize: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_for(sess, feeds, seconds: float) -> list[float]:
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 3:
        begin = time.perf_counter()
        sess.run(None, feeds)
        latencies.append(time.perf_counter() - begin)
    return latencies


def side_by_side(sessions: dict, info, cycles: int, slice_seconds: float) -> dict[str, dict[str, float]]:
    """Many short slices, every session in turn within each cycle (rotating the order), so load from
    other processes falls on all of them alike. Per session: p50 over all batch-1 runs, median
    throughput at the max batch over the cycles, and per cycle its throughput relative to the
    ort-default baseline measured in the same cycle (the median of these paired ratios is reported)."""
    small = info.sample_inputs(1, seed=11)
    large = info.sample_inputs(testmodels.MAX_BATCH, seed=12)
    for sess in sessions.values():  # warmup
        for _ in range(3):
            sess.run(None, small)
            sess.run(None, large)
    names = list(sessions)
    batch1: dict[str, list[float]] = {name: [] for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for cycle in range(cycles):
        order = names[cycle % len(names):] + names[:cycle % len(names)]
        for name in order:
            batch1[name].extend(run_for(sessions[name], small, slice_seconds))
            latencies = run_for(sessions[name], large, slice_seconds)
            rates[name].append(testmodels.MAX_BATCH * len(latencies) / sum(latencies))
    base = rates["ort-default"]
    unoptimized = rates["unoptimized"]
    return {name: {"p50_ms": statistics.median(batch1[name]) * 1000,
                   "throughput": statistics.median(rates[name]),
                   "ratio": statistics.median(r / b for r, b in zip(rates[name], base)),
                   "ratio_unoptimized": statistics.median(r / u for r, u in zip(rates[name], unoptimized)),
                   "spread": (min(r / b for r, b in zip(rates[name], base)), max(r / b for r, b in zip(rates[name], base)))}
            for name in names}


def build(info, candidate: dict, calibration: Path, store: Path, workdir: Path):
    build_spec = {key: value for key, value in candidate.items() if key != "calibration"}
    if candidate.get("calibration"):
        build_spec["calibration"] = {"uri": calibration.as_uri(), "samples": 64}
    build_spec["accuracy"] = {"minCosine": MIN_COSINE, "samples": 8}
    spec = InferenceModelSpec.model_validate({
        "model": {"uri": info.path.as_uri(), "inputs": info.spec_inputs()},
        "build": build_spec,
        "storage": {"uri": store.as_uri()},
    })
    result = run_build(BuildRequest(spec=spec, workdir=workdir, backend="onnxruntime",
                                    benchmark=BenchmarkBudget(warmup=1, min_iterations=3, max_iterations=5, seconds=0.05)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every session (default 1)")
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=0.05, help="timed seconds per slice")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # ONNX Runtime quantization tips are not results

    rows = []
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="plansmith-bench-") as tmp:
        root = Path(tmp)
        store = root / "store"
        for kind, (candidates, target) in CANDIDATES.items():
            info = getattr(testmodels, kind)(root / f"{kind}.onnx")
            calibration = testmodels.write_calibration(root / f"{kind}.npz", info, samples=64)
            sessions = {"ort-default": session(info.path, args.threads, True),
                        "unoptimized": session(info.path, args.threads, False)}
            built = {}
            for index, candidate in enumerate(candidates):
                label = candidate["precision"] + ("-calibrated" if candidate.get("calibration") else
                                                  f"-{candidate['quantization']}" if "quantization" in candidate else "")
                result = build(info, candidate, calibration, store, root / f"work-{kind}-{index}")
                if result.status != "built":
                    rows.append((kind, label, f"failed: {result.reason}", "", "", "", "", "", ""))
                    continue
                manifest = parse_manifest((store / "engines" / result.key / "manifest.json").read_bytes())
                engine_path = store / "engines" / result.key / manifest.artifact("engine").name
                sessions[label] = session(engine_path, args.threads, True)
                built[label] = manifest.accuracy.cosine
            figures = side_by_side(sessions, info, args.cycles, args.seconds)
            base = figures["ort-default"]
            rows.append((kind, "fp32 original", "1.000000", f"{base['p50_ms']:.3f}", f"{base['throughput']:.0f}",
                         "1.00x", "", f"{base['ratio_unoptimized']:.2f}x", ""))
            best_label, best_ratio, best_unoptimized = None, 0.0, 0.0
            for label, cosine in built.items():
                engine = figures[label]
                ratio = engine["ratio"]
                low, high = engine["spread"]
                rows.append((kind, label, f"{cosine:.6f}", f"{engine['p50_ms']:.3f}", f"{engine['throughput']:.0f}",
                             f"{ratio:.2f}x", f"{low:.2f}-{high:.2f}", f"{engine['ratio_unoptimized']:.2f}x",
                             f"{base['p50_ms'] / engine['p50_ms']:.2f}x"))
                eligible = cosine >= MIN_COSINE and (target == "best" or label.startswith(target or "-"))
                if eligible and ratio > best_ratio:
                    best_label, best_ratio, best_unoptimized = label, ratio, engine["ratio_unoptimized"]
            if target:
                met = best_ratio >= TARGET_RATIO
                verdicts.append(f"{kind}: {best_label or 'no engine'} {best_ratio:.2f}x throughput vs ort-default, "
                                f"{best_unoptimized:.2f}x vs unoptimized (target {TARGET_RATIO}x vs ort-default): "
                                f"{'MET' if met else 'MISSED'}")

    header = ("model", "engine", "gate cosine", "p50 b1 ms", f"items/s b{testmodels.MAX_BATCH}",
              "thr vs ort-default", "(range)", "thr vs unoptimized", "p50 b1 speedup")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"plansmith build benchmark: CPU, {args.threads} intra-op thread(s), {args.cycles} interleaved cycles; "
          f"medians; throughput at batch {testmodels.MAX_BATCH}; ratios paired per cycle")
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    for verdict in verdicts:
        print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
