"""`plansmith operator`: run the kopf operator with plansmith's handlers."""

from __future__ import annotations

import argparse


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
    parser.add_argument("--priority", type=int, default=0, help="this replica's peering priority")
    parser.add_argument("--verbose", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import logging

    import kopf

    import plansmith.controller.handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    for noisy in ("kubernetes", "botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        namespaces=args.namespace or None,
        clusterwide=not args.namespace,
    )
    return 0
