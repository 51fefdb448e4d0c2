#!/usr/bin/env bash
# The main job: set everything up, check the example InferenceModel, and show it on a real
# Kubernetes API server (etcd + kube-apiserver v1.20.2 on loopback): CRD installed, example applied,
# `kubectl get inferencemodels` and `kubectl explain` answered by the server.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
exec .venv/bin/python -m plansmith.devcluster.quickstart
