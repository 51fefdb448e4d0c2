#!/usr/bin/env bash
# The local cluster with real pods, from a fresh clone: set everything up (deploy/local/setup.sh),
# then `plansmith dev-cluster ACTION`. See docs/local-cluster.md.
#
#   deploy/local/dev-cluster.sh up          # start (idempotent); prints the kubeconfig path
#   deploy/local/dev-cluster.sh load-image  # rebuild plansmith/{operator,builder,runtime}:dev from this tree
#   deploy/local/dev-cluster.sh status
#   deploy/local/dev-cluster.sh down        # stop what `up` started, undo its host changes
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
exec .venv/bin/plansmith dev-cluster "$@"
