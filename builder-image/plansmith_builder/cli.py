"""`plansmith build MODEL.yaml`: build (or find) the engine for one InferenceModel on this machine.

    plansmith build MODEL.yaml [--store URI] [--endpoint URL] [--backend auto|tensorrt|onnxruntime]
                               [--target auto|cpu|cpu:<isa>|<compute capability>] [--simulated-gpu]
                               [--workdir DIR] [--quick-benchmark]

MODEL.yaml may be `-` (stdin) or `env:NAME`: the manifest in environment variable NAME, which is how
the operator's build Jobs pass it (PLANSMITH_MODEL).

--target names the hardware the engine is for, and thus its key: the operator passes the GPU type
it pinned the Job to (9.0) or `cpu:<arch>` for CPU-only clusters. --simulated-gpu is for clusters
whose GPUs are simulated (plansmith dev-cluster): the engine is keyed for the GPU type but built for
and run on the CPU, and its manifest says so (target.executionProvider CPUExecutionProvider).

Prints one JSON line on stdout, and writes it to /dev/termination-log when that file is writable
(Kubernetes shows it as the container's termination message):

    {"status": "built"|"hit"|"failed", "key": ..., "manifestUri": ..., "reason": ..., "message": ...}

Exit codes:
    0   built, or hit (a verified engine with this key already exists; nothing written)
    1   permanent failure: InvalidSpec, ModelNotFound, IntegrityError, UnsupportedModel,
        AccuracyGateFailed, BackendUnavailable, BuildFailed (the same inputs fail again)
    2   command-line usage error
    75  retryable failure: StorageUnavailable (the store could not be reached; run again later)

Progress goes to stderr: phases and byte counts on a terminal, key=value log lines otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

TERMINATION_LOG = Path("/dev/termination-log")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build the engine for an InferenceModel on this machine and publish it to the engine store",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL.yaml", help="an InferenceModel manifest (- for stdin, env:NAME for "
                                                            "an environment variable)")
    parser.add_argument("--store", metavar="URI", help="engine store (s3://bucket/prefix or file:///path); "
                                                       "default: spec.storage.uri")
    parser.add_argument("--endpoint", metavar="URL", help="S3-compatible endpoint; default: spec.storage.endpoint, "
                                                          "then PLANSMITH_S3_ENDPOINT / AWS_ENDPOINT_URL_S3")
    parser.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"),
                        help="engine backend; default: spec.build.backend")
    parser.add_argument("--target", default="auto", metavar="auto|cpu|cpu:ISA|CC",
                        help="auto: this machine's GPU, else its CPU; cpu; cpu:<isa> such as cpu:x86_64; "
                             "or a compute capability such as 9.0")
    parser.add_argument("--simulated-gpu", action="store_true",
                        help="the GPU named by --target is simulated: key the engine for it, build and run it on the CPU")
    parser.add_argument("--expected-key", metavar="KEY", default=os.environ.get("PLANSMITH_ENGINE_KEY") or None,
                        help="fail with KeyMismatch, publishing nothing, unless the engine's key is KEY "
                             "(default: $PLANSMITH_ENGINE_KEY, which the operator's build Jobs set)")
    parser.add_argument("--workdir", metavar="DIR", type=Path, help="keep intermediate files here (default: a "
                                                                     "temporary folder, removed afterwards)")
    parser.add_argument("--quick-benchmark", action="store_true",
                        help="time fewer runs (0.2 s per figure instead of 2 s): for tests and demos")
    parser.add_argument("--termination-log", metavar="PATH", type=Path, default=TERMINATION_LOG,
                        help=argparse.SUPPRESS)
    parser.set_defaults(handler=cmd_build)


def _load_spec(name: str):
    """The InferenceModel's spec, or a BuildError(InvalidSpec) naming every problem."""
    from plansmith.validation import InvalidSpec, single_model
    from plansmith_builder.errors import BuildError

    try:
        if name == "-":
            text = sys.stdin.read()
        elif name.startswith("env:"):
            text = os.environ.get(name[4:])
            if text is None:
                raise BuildError("InvalidSpec", f"environment variable {name[4:]} is not set")
        else:
            text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BuildError("InvalidSpec", f"{name}: cannot read: {getattr(error, 'strerror', None) or error}") from None
    try:
        return single_model(text, source=name).spec
    except InvalidSpec as error:
        raise BuildError("InvalidSpec", f"{name}: " + "; ".join(str(p) for p in error.problems)) from None


def _write_termination_log(path: Path, line: str) -> None:
    try:
        if path.is_file() and os.access(path, os.W_OK):  # Kubernetes creates it; never create it elsewhere
            path.write_text(line + "\n", encoding="utf-8")
    except OSError:
        pass  # outside Kubernetes the file is usually absent or read-only; stdout has the result


def cmd_build(args: argparse.Namespace) -> int:
    from plansmith_builder.benchmark import BenchmarkBudget
    from plansmith_builder.build import BuildRequest, BuildResult, run_build
    from plansmith_builder.errors import BuildError, exit_code
    from plansmith_builder.progress import Progress

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        spec = _load_spec(args.model)
    except BuildError as error:
        result = BuildResult("failed", reason=error.reason, message=error.message)
    else:
        budget = BenchmarkBudget(warmup=2, min_iterations=5, max_iterations=50, seconds=0.2) \
            if args.quick_benchmark else BenchmarkBudget()
        result = run_build(BuildRequest(spec=spec, store_uri=args.store, endpoint=args.endpoint,
                                        backend=args.backend, target=args.target, workdir=args.workdir,
                                        simulated_gpu=args.simulated_gpu, expected_key=args.expected_key,
                                        benchmark=budget, progress=Progress()))
    line = result.to_json()
    print(line, flush=True)
    _write_termination_log(args.termination_log, line)
    return exit_code(result.status, result.reason)
