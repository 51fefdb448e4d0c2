#!/usr/bin/env bash
# Set up everything plansmith's tests and quick start need on a Debian bookworm machine (as root):
# Debian packages, the Kubernetes v1.20.2 binaries (built once, cached outside the clone), and a
# virtual environment in .venv with the package and all its extras. Safe to re-run; quick when done.
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { echo "[setup] $*" >&2; }
start=$(date +%s)

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { log "plansmith needs Python >= 3.11"; exit 1; }

# Debian packages + Kubernetes binaries (first run: ~5-10 min of Go build; later: instant)
K8S_BIN=$(bash deploy/local/kubernetes-binaries.sh | tail -1)
log "Kubernetes binaries: $K8S_BIN"

# Python environment, reinstalled only when pyproject.toml changes
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "installing plansmith with all extras into .venv (one resolver run, see GUIDE.md on python-dateutil)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
.venv/bin/pip check >&2
log "ready in $(( $(date +%s) - start )) s"
