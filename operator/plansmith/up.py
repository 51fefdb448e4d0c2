"""`plansmith up MODEL.yaml`: try a model on this machine before deploying it - build its engine here
(or find it in the store) and serve it, with the same YAML a cluster would get.

    plansmith up model.yaml                               # store: spec.storage.uri, else ~/.cache/plansmith
    plansmith up model.yaml --store file:///tmp/engines --http-port 8000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_STORE = Path.home() / ".cache" / "plansmith"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up", help="build an InferenceModel's engine for this machine and serve it (no cluster needed)",
        description="Builds (or finds) the engine with `plansmith build`, then serves it with `plansmith serve`.")
    parser.add_argument("spec", metavar="MODEL.yaml")
    parser.add_argument("--store", metavar="URI",
                        help=f"engine store; default: spec.storage.uri, else {DEFAULT_STORE.as_uri()}")
    parser.add_argument("--endpoint", metavar="URL", help="S3-compatible endpoint for s3:// URIs")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.set_defaults(handler=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    from plansmith.cli import main as plansmith
    from plansmith.validation import SpecFileError, read_single_model
    from plansmith_builder.build import BuildRequest, run_build
    from plansmith_builder.errors import exit_code
    from plansmith_builder.progress import Progress

    try:
        model = read_single_model(args.spec)
    except SpecFileError as error:
        print(error, file=sys.stderr)
        return 1
    store = args.store or model.spec.storage.uri or DEFAULT_STORE.as_uri()
    result = run_build(BuildRequest(spec=model.spec, store_uri=store, endpoint=args.endpoint, progress=Progress()))
    print(result.to_json(), flush=True)
    if result.status == "failed":
        return exit_code(result.status, result.reason)
    return plansmith(["serve", args.spec, "--manifest", result.manifest_uri, "--host", args.host,
                      "--http-port", str(args.http_port), "--grpc-port", str(args.grpc_port),
                      "--metrics-port", str(args.metrics_port)]
                     + (["--endpoint", args.endpoint] if args.endpoint else []))
