"""`plansmith serve`: serve one engine over KServe v2 / Triton HTTP and gRPC.

    plansmith serve MODEL.yaml                       # settings from spec.serving, engine via the builder
    plansmith serve --manifest s3://b/engines/K/manifest.json --max-batch-size 32 --preferred-batch-sizes 8,16
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from plansmith_runtime.system_metrics import DEFAULT_INTERVAL_MS

RESERVED_LOG_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in RESERVED_LOG_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _integer_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer of at least `minimum` (and at most `maximum`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, at least 0, got {text}")
    return value


PORT = _integer_at_least(0, 65535)  # 0: any free port


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return sizes


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an engine over the KServe v2 / Triton protocol (HTTP, gRPC, metrics)",
        description="Load the engine a manifest names (verifying every sha256 and that it fits this machine), warm it "
                    "up, and serve it. Serving settings come from MODEL.yaml's spec.serving; flags override them.")
    parser.add_argument("spec", nargs="?", metavar="MODEL.yaml", help="InferenceModel file (settings, name, engine)")
    parser.add_argument("--manifest", metavar="URI", help="engine manifest (s3:// or file://, or its engine folder)")
    parser.add_argument("--model-name", help="name on the wire (default: metadata.name, else 'model')")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--http-port", type=PORT, default=8000)
    parser.add_argument("--grpc-port", type=PORT, default=8001)
    parser.add_argument("--metrics-port", type=PORT, default=8002)
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: the spec's, then PLANSMITH_S3_ENDPOINT)")
    parser.add_argument("--cache-dir", type=Path, help="where to keep the downloaded artifacts (default: a temp dir)")
    batching = parser.add_argument_group("batching (override spec.serving)")
    batching.add_argument("--max-batch-size", type=_integer_at_least(0))
    batching.add_argument("--no-batching", action="store_true", help="run every request on its own")
    batching.add_argument("--preferred-batch-sizes", type=_sizes, metavar="N,N")
    batching.add_argument("--max-queue-delay-us", type=_integer_at_least(0))
    batching.add_argument("--max-queue-size", type=_integer_at_least(1))
    batching.add_argument("--timeout-us", type=_integer_at_least(0), help="reject requests queued longer than this")
    batching.add_argument("--instances", type=_integer_at_least(1), help="execution instances running batches concurrently")
    batching.add_argument("--intra-op-threads", type=_integer_at_least(0), default=0, help="threads per ONNX Runtime session (0: the CPUs this process may use, "
                          "affinity and cgroup quota, shared between the instances)")
    batching.add_argument("--warmup-iterations", type=_integer_at_least(1))
    batching.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--pinned-memory-pool-byte-size", type=_integer_at_least(0), metavar="BYTES",
                        help="Triton's: pinned host memory the GPU executors may join batches in, for faster copies "
                             "to the device (default 268435456, 256 MB; 0: none, batches stay in pageable memory)")
    parser.add_argument("--grace-seconds", type=_seconds, default=30.0, help="SIGTERM: time to finish in-flight requests")
    parser.add_argument("--metrics-interval-ms", type=_integer_at_least(1), default=DEFAULT_INTERVAL_MS,
                        help="how often the GPU and CPU metrics (nv_gpu_*, nv_cpu_*) are polled, as Triton's flag")
    parser.add_argument("--metrics-config", action="append", default=[], metavar="KEY=VALUE",
                        help="Triton's: summary_latencies=true adds nv_inference_*_summary_us (p50 ... p99.9 over "
                             "the last minute); summary_quantiles=0.5:0.05,0.99:0.001 picks the quantiles")
    parser.add_argument("--trace-config", action="append", default=[], metavar="[MODE,]KEY=VALUE",
                        help="Triton's request tracing: level=TIMESTAMPS (and/or level=TENSORS), rate=N (trace every "
                             "N-th request, default 1000), count=N (-1: no limit), mode=triton (default) or "
                             "mode=opentelemetry. Mode triton: triton,file=PATH (where traces go), "
                             "triton,log-frequency=N (write every N traces to PATH.0, PATH.1, ...; 0: to PATH at "
                             "exit). Mode opentelemetry (spans to a collector; requests with a W3C traceparent "
                             "always traced): opentelemetry,url=URL (OTLP/HTTP, default "
                             "http://localhost:4318/v1/traces), opentelemetry,resource=KEY=VALUE, "
                             "opentelemetry,bsp_max_queue_size=N, bsp_schedule_delay=MS, bsp_max_export_batch_size=N. "
                             "Clients change level, rate, count and log-frequency through tritonclient's "
                             "update_trace_settings")
    parser.add_argument("--cache-config", action="append", default=[], metavar="local,size=BYTES",
                        help="Triton's response cache: requests with the inputs of an earlier one are answered with "
                             "its outputs, up to BYTES of them (least recently used go first)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR or CRITICAL at start; clients change "
                        "it at runtime through Triton's logging extension (tritonclient's update_log_settings)")
    parser.set_defaults(handler=cmd_serve)

    repository = subparsers.add_parser(
        "triton-repository", help="write the Triton model repository that serves an engine (serving.runtime: triton)",
        description="Render config.pbtxt from the InferenceModel's spec and the engine's manifest, download the engine "
                    "(verifying its sha256) beside it, under DIR: what a serving pod's init container gives "
                    "`tritonserver --model-repository=DIR`. Prints one JSON line; on failure a JSON error and exit 1.")
    repository.add_argument("--manifest", required=True, metavar="URI", help="engine manifest (s3:// or file://)")
    repository.add_argument("--model-name", required=True, help="the model's name in the repository and on the wire")
    repository.add_argument("--spec-json", required=True, metavar="JSON", help="the InferenceModel's spec, as JSON")
    repository.add_argument("--out", required=True, type=Path, metavar="DIR", help="the model repository folder")
    repository.add_argument("--endpoint", help="S3 endpoint URL (default: the spec's, then PLANSMITH_S3_ENDPOINT)")
    repository.set_defaults(handler=cmd_triton_repository)


def cmd_triton_repository(args: argparse.Namespace) -> int:
    import json

    from plansmith.engine_key import storage_of
    from plansmith.manifest import ManifestError, parse_manifest
    from plansmith.storage import StorageError, open_store
    from plansmith.validation import InvalidSpec, parse_spec
    from plansmith_runtime.loader import normalize_manifest_uri
    from plansmith_runtime.triton_repo import RepositoryError, render_repository, write_repository

    def failed(reason: str, message: str) -> int:
        print(json.dumps({"status": "failed", "reason": reason, "message": message}))
        return 1

    try:
        spec = parse_spec(json.loads(args.spec_json))
    except (ValueError, InvalidSpec) as error:
        return failed("InvalidSpec", str(error))
    endpoint = args.endpoint or spec.storage.endpoint
    uri = normalize_manifest_uri(args.manifest)
    try:
        manifest = parse_manifest(open_store(uri, endpoint).read_bytes(uri))
        repository = render_repository(args.model_name, spec, [manifest])
        written = write_repository(repository, args.out, storage_of(uri), endpoint)
    except (StorageError, ManifestError, RepositoryError, ValueError, OSError) as error:  # OSError: --out unwritable
        return failed(type(error).__name__, str(error))
    print(json.dumps({"status": "written", "repository": str(args.out),
                      "files": sorted(str(path.relative_to(args.out)) for path in written)}))
    return 0


def serving_config(args: argparse.Namespace, spec_serving, default_name: str):
    """Spec settings (or defaults: batching on, max batch from the flags) with flags applied."""
    from dataclasses import replace

    from plansmith.spec import DynamicBatching, ServingSpec
    from plansmith_runtime.config import ServingConfig, policy_from_spec
    from plansmith_runtime.response_cache import parse_cache_config
    from plansmith_runtime.summaries import parse_metrics_config
    from plansmith_runtime.tracing import parse_trace_config

    serving = spec_serving or ServingSpec(dynamic_batching=DynamicBatching())
    policy = policy_from_spec(serving)
    overrides = {}
    if args.max_batch_size is not None:
        overrides["max_batch_size"] = args.max_batch_size
    if args.preferred_batch_sizes is not None:
        overrides["preferred_batch_sizes"] = tuple(sorted(set(args.preferred_batch_sizes)))
    if args.max_queue_delay_us is not None:
        overrides["max_queue_delay_us"] = args.max_queue_delay_us
    if args.max_queue_size is not None:
        overrides["max_queue_size"] = args.max_queue_size
    if args.timeout_us is not None:
        overrides["timeout_us"] = args.timeout_us
    if args.no_batching:
        overrides["enabled"] = False
    policy = replace(policy, **overrides)
    return ServingConfig(
        model_name=args.model_name or default_name,
        policy=policy,
        instances=args.instances or serving.instances,
        warmup_enabled=serving.warmup.enabled and not args.no_warmup,
        warmup_iterations=args.warmup_iterations or serving.warmup.iterations,
        intra_op_threads=args.intra_op_threads,
        grace_seconds=args.grace_seconds,
        metrics_interval_ms=args.metrics_interval_ms,
        # the spec's choice first: a --metrics-config setting given on the command line overrides it
        summary_quantiles=parse_metrics_config(
            ["summary_latencies=true"] * serving.metrics.latency_summaries + args.metrics_config),
        # the spec's settings first: a --trace-config entry given on the command line overrides them
        trace=parse_trace_config([*(serving.trace.trace_config() if serving.trace else ()), *args.trace_config]),
        # the spec's size first: a --cache-config given on the command line overrides it
        response_cache_bytes=parse_cache_config(
            [*([serving.response_cache.cache_config()] if serving.response_cache else ()), *args.cache_config]),
        max_batch_from_engine=spec_serving is None and args.max_batch_size is None,
    )


def find_manifest_with_builder(model, args) -> str:
    """The engine for this spec on this machine, through the builder's API (a cache hit only
    verifies; a miss builds and publishes it, so `plansmith serve MODEL.yaml` works locally)."""
    try:
        from plansmith_builder.build import BuildRequest, run_build
    except ImportError:
        raise SystemExit("plansmith serve: give --manifest URI (the builder is not installed to find the engine)") from None
    result = run_build(BuildRequest(spec=model.spec, endpoint=args.endpoint))
    if result.status == "failed" or not result.manifest_uri:
        raise SystemExit(f"plansmith serve: no engine for {args.spec}: {result.reason}: {result.message}")
    logging.getLogger(__name__).info("engine found through the builder",
                                     extra={"status": result.status, "manifest": result.manifest_uri})
    return result.manifest_uri


def cmd_serve(args: argparse.Namespace) -> int:
    from plansmith_runtime.log_settings import InvalidLogSetting, install

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    try:
        log_control = install(args.log_level, handler)
    except InvalidLogSetting as error:
        print(f"plansmith serve: --log-level: {error}", file=sys.stderr)
        return 2

    from plansmith.validation import SpecFileError, read_single_model
    from plansmith_runtime.config import ConfigError
    from plansmith_runtime.model import LoadOptions
    from plansmith_runtime.server import Listen, run

    model = None
    if args.spec:
        try:
            model = read_single_model(args.spec)
        except SpecFileError as error:
            print(error, file=sys.stderr)
            return 1
    elif not args.manifest:
        print("plansmith serve: give MODEL.yaml or --manifest URI", file=sys.stderr)
        return 2
    try:
        config = serving_config(args, model.spec.serving if model else None,
                                model.metadata.name if model else "model")
    except (ConfigError, ValueError) as error:
        print(f"plansmith serve: {error}", file=sys.stderr)
        return 2
    endpoint = args.endpoint or (model.spec.storage.endpoint if model else None)
    manifest = args.manifest or find_manifest_with_builder(model, args)
    listen = Listen(args.host, args.http_port, args.grpc_port, args.metrics_port)
    try:
        options = LoadOptions(manifest, args.cache_dir, endpoint)
        if args.pinned_memory_pool_byte_size is not None:
            options.pinned_memory_pool_bytes = args.pinned_memory_pool_byte_size
        return run(config, options, listen, log_control)
    except OSError as error:  # a port in use or an address that is not ours
        print(f"plansmith serve: cannot listen: {error}", file=sys.stderr)
        return 1
