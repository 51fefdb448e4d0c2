"""`plansmith operator`: run the kopf operator with plansmith's handlers."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
from typing import Mapping


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the operator (reconciles InferenceModels into build Jobs and serving Deployments)",
        description="Settings come from PLANSMITH_* environment variables (see plansmith.controller.settings).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch InferenceModels in this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--peering", metavar="NAME", default=None,
                        help="kopf peering object: with several replicas only the one of highest priority acts")
    parser.add_argument("--priority", type=int, default=None,
                        help="this replica's peering priority (default: derived from its identity, so that "
                             "replicas differ; kopf freezes every replica when the highest priority is shared)")
    parser.add_argument("--health-port", type=int, default=None, metavar="PORT",
                        help="serve kopf's liveness endpoint at http://0.0.0.0:PORT/healthz (for a livenessProbe)")
    parser.add_argument("--verbose", action="store_true")
    parser.set_defaults(handler=run)


def operator_identity(env: Mapping[str, str], hostname: str, pid: int) -> str:
    """The name this replica goes by in kopf's peering and progress annotations: the pod's name when the
    chart passes it (PLANSMITH_POD_NAME), else host and process. Set explicitly because kopf's default
    asks the password database for the user name, which fails for a container's arbitrary non-root UID."""
    return env.get("PLANSMITH_POD_NAME") or f"{hostname}/{pid}"


def peering_priority(identity: str) -> int:
    """A stable priority in [1, 1_000_000) from the replica's identity: replicas of one Deployment get
    different priorities, so exactly one of them acts and the others stand by."""
    return 1 + int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") % 999_999


def run(args: argparse.Namespace) -> int:
    import logging

    import kopf

    import plansmith.controller.handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    for noisy in ("kubernetes", "botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    identity = operator_identity(os.environ, socket.gethostname(), os.getpid())
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority if args.priority is not None else peering_priority(identity),
        identity=identity,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        namespaces=args.namespace or None,
        clusterwide=not args.namespace,
    )
    return 0
