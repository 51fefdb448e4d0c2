"""The README's main job, as far as plansmith goes today: validate the example InferenceModel, then
show it on a real Kubernetes API server (CRD installed, object applied, listed and explained).

Run with `make quickstart` (which sets everything up first)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from plansmith.devcluster.binaries import REPO_ROOT
from plansmith.devcluster.controlplane import ControlPlane
from plansmith.validation import InvalidSpec, load_models

EXAMPLE = REPO_ROOT / "deploy" / "examples" / "model.yaml"
CRD = REPO_ROOT / "crds" / "inferencemodel.yaml"


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def kubectl(plane: ControlPlane, *args: str, retry_for: float = 0) -> str:
    deadline = time.monotonic() + retry_for
    while True:
        result = subprocess.run([str(plane.kubectl), "--kubeconfig", str(plane.kubeconfig), *args],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout
        if time.monotonic() > deadline:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        time.sleep(0.5)


def main() -> int:
    step(f"plansmith validate {EXAMPLE.relative_to(REPO_ROOT)}")
    try:
        (model,) = load_models(EXAMPLE.read_text(), str(EXAMPLE))
    except InvalidSpec as error:
        print(error, file=sys.stderr)
        return 1
    spec = model.spec
    print(f"InferenceModel {model.metadata.name!r}: {spec.build.precision} engines via backend {spec.build.backend}, "
          f"maxBatchSize {spec.serving.max_batch_size}, {spec.serving.instances} instance(s) per pod")

    workdir = REPO_ROOT / ".local" / "quickstart"
    step("starting etcd + kube-apiserver + controller-manager + scheduler (v1.20.2, loopback)")
    started = time.monotonic()
    plane = ControlPlane(workdir).start()
    try:
        print(f"API server {plane.server} ready in {time.monotonic() - started:.1f} s; kubeconfig {plane.kubeconfig}")
        step("kubectl apply -f crds/inferencemodel.yaml")
        print(kubectl(plane, "apply", "-f", str(CRD)), end="")
        kubectl(plane, "wait", "--for=condition=Established", "crd/inferencemodels.plansmith.io", "--timeout=60s")
        step("kubectl apply -f deploy/examples/model.yaml")
        print(kubectl(plane, "apply", "-f", str(EXAMPLE), retry_for=30), end="")
        step("kubectl get inferencemodels")
        print(kubectl(plane, "get", "inferencemodels"), end="")
        step("kubectl explain inferencemodel.spec.serving.dynamicBatching")
        print(kubectl(plane, "explain", "inferencemodel.spec.serving.dynamicBatching", retry_for=60), end="")
        step("a bad object is refused by the API server's schema")
        bad = EXAMPLE.read_text().replace("precision: fp16", "precision: fp64")
        result = subprocess.run([str(plane.kubectl), "--kubeconfig", str(plane.kubeconfig), "apply", "-f", "-"],
                                input=bad, capture_output=True, text=True)
        print(result.stderr.strip() or result.stdout.strip())
    finally:
        plane.stop()
    print("\nDone. The operator, builder and runtime that act on this object are the next milestones (see README).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
