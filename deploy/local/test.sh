#!/usr/bin/env bash
# Run the test suite after setting everything up. Extra arguments go to pytest, e.g.
#   deploy/local/test.sh -m "not controlplane"     (unit tests only, seconds)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
exec .venv/bin/python -m pytest "$@"
