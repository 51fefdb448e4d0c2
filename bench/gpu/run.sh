#!/usr/bin/env bash
# Issue 7 GPU benchmark: install the carried wheels into a target folder, then run bench/gpu/bench.py.
#
#   bench/gpu/run.sh --cpu-smoke                 # rehearsal on this machine's CPU (small shapes)
#   bench/gpu/run.sh --phase build --out "$OUT"  # on the GPU machine: export, build, in-process figures
#   bench/gpu/run.sh --phase serve --out "$OUT"  # then: plansmith serve + tritonclient load
#
# Wheels: every .whl in <repo>/.whl (plansmith and the dependencies the machine lacks, for its
# Python), plus onnxruntime-gpu joined from the parts in $PLANSMITH_GPU_PARTS (split because one
# device call carries at most 64 MiB; a NAME.sha256 file next to the parts is checked).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SITE=${PLANSMITH_GPU_SITE:-/tmp/plansmith-gpu-site}
PARTS=${PLANSMITH_GPU_PARTS:-/tmp/parts}
PY=${PYTHON:-python3}

if [ ! -f "$SITE/.installed" ]; then
  wheels=("$ROOT"/.whl/*.whl)
  shopt -s nullglob
  first=("$PARTS"/*.whl.part-00)
  shopt -u nullglob
  if [ ${#first[@]} -gt 0 ]; then
    name=$(basename "${first[0]}" .part-00)
    cat "$PARTS/$name".part-* > "/tmp/$name"
    (cd /tmp && sha256sum -c "$PARTS/$name.sha256")
    wheels+=("/tmp/$name")
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  touch "$SITE/.installed"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/bench/gpu/bench.py" "$@"
