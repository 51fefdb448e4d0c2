"""`plansmith dev-cluster up|down|status|load-image`: the local cluster with real pods."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dev-cluster",
        help="a local Kubernetes v1.20.2 cluster whose pods really run here (simulated GPUs)",
        description="Start, stop or inspect the local cluster (root, Debian bookworm). State lives in "
                    "/var/lib/plansmith-dev (PLANSMITH_DEV_STATE); see docs/local-cluster.md.",
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="state folder (default /var/lib/plansmith-dev)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start the cluster (idempotent); prints the kubeconfig path")
    up.add_argument("--no-plansmith-images", action="store_true",
                    help="skip building/importing plansmith/{operator,builder,runtime}:dev")
    actions.add_parser("down", help="stop what `up` started and undo its host changes")
    actions.add_parser("status", help="say whether the cluster is up and where its kubeconfig is")
    actions.add_parser("load-image", help="rebuild the plansmith images from this tree and import them on every node")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from plansmith.devcluster import cluster
    from plansmith.devcluster.host import HostSetupFailed
    from plansmith.devcluster.images import ImageBuildFailed
    from plansmith.devcluster.processes import ServiceFailed

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.action == "up":
            cluster.up(args.state_dir, plansmith_images=not args.no_plansmith_images)
        elif args.action == "down":
            cluster.down(args.state_dir)
        elif args.action == "load-image":
            cluster.load_image(args.state_dir)
        else:
            running = cluster.status(args.state_dir)
            if running is None:
                print("dev cluster is not up")
                return 1
            print(cluster.summary(running))
    except (ServiceFailed, ImageBuildFailed, HostSetupFailed) as error:
        print(f"plansmith dev-cluster {args.action}: {error}", file=sys.stderr)
        return 1
    return 0
