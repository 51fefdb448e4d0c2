"""The README's main job: plansmith end to end on a local cluster whose pods really run here.

1. `plansmith dev-cluster up` (Kubernetes v1.20.2, two simulated GPU types, moto S3, local images);
2. install plansmith with its Helm chart (the operator runs in a pod);
3. upload a small generated CNN to S3 and `kubectl apply -f deploy/examples/model.yaml`;
4. wait for Ready while showing each target's progress (build Jobs, engines, serving pods);
5. send a real inference request with tritonclient to the model's Service and check the answer
   against ONNX Runtime on the original model; print the engine records and how to go further.

Safe to re-run (everything is create-or-update); `make down` tears it all down.
Run with `make quickstart`, which sets everything up first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from plansmith import testmodels
from plansmith.devcluster import cluster
from plansmith.devcluster.binaries import REPO_ROOT
from plansmith.devcluster.helm import helm_binary
from plansmith.devcluster.service_route import wait_until_routed
from plansmith.validation import load_models

EXAMPLE = REPO_ROOT / "deploy" / "examples" / "model.yaml"
CHART = REPO_ROOT / "charts" / "plansmith"
RELEASE, RELEASE_NAMESPACE = "plansmith", "plansmith-system"
READY_TIMEOUT = 900


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


class Kubectl:
    def __init__(self, dev: cluster.DevCluster):
        # a discovery cache of this process only: one left by an earlier cluster at the same address
        # would not know the InferenceModel CRD
        self.cache = tempfile.mkdtemp(prefix="plansmith-kubectl-")
        self.base = [str(dev.kubectl), "--kubeconfig", str(dev.kubeconfig), "--cache-dir", self.cache]

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json"))


def install_chart(dev: cluster.DevCluster, kubectl: Kubectl) -> None:
    import onnxruntime

    values = {
        "images.operator": "docker.io/plansmith/operator:dev",
        "images.builder": "docker.io/plansmith/builder:dev",
        "images.runtime": "docker.io/plansmith/runtime:dev",
        "images.pullPolicy": "Never",
        "storage.endpoint": dev.s3_endpoint,
        "build.backendVersion": onnxruntime.__version__,  # the images install the same wheels as this venv
        "build.simulatedGpus": "true",
        "watchNamespaces": "{default}",
        "rbac.secretNamespaces": "{default}",
    }
    args = [str(helm_binary()), "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
            "--create-namespace", "--kubeconfig", str(dev.kubeconfig), "--wait", "--timeout", "5m"]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"helm upgrade --install failed: {result.stderr.strip()}")
    print(result.stdout.strip().splitlines()[0] if result.stdout.strip() else "installed")
    print(kubectl("get", "deployment", "-n", RELEASE_NAMESPACE), end="")


def upload_model(dev: cluster.DevCluster, model_uri: str, workdir: Path) -> testmodels.TestModel:
    import boto3

    model = testmodels.small_cnn(workdir / "tiny-cnn.onnx")
    bucket, key = model_uri[len("s3://"):].split("/", 1)
    credentials = dev.s3_credentials()
    s3 = boto3.client("s3", endpoint_url=dev.s3_endpoint, region_name=credentials["AWS_DEFAULT_REGION"],
                      aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])
    s3.upload_file(str(model.path), bucket, key)
    print(f"uploaded {model.path.name} ({model.path.stat().st_size} bytes) to {model_uri}")
    return model


def describe(model: dict) -> str:
    status = model.get("status", {})
    parts = [f"phase {status.get('phase', 'Pending')}"]
    for target in status.get("targets", []):
        label = f"{target.get('gpuProduct') or 'cpu'}"
        state = target.get("state", "?")
        if target.get("reason"):
            state += f" ({target['reason']})"
        parts.append(f"{label}: {state}")
    serving = status.get("serving") or {}
    if serving.get("replicas"):
        parts.append(f"serving {serving.get('readyReplicas', 0)}/{serving['replicas']} ready")
    return " | ".join(parts)


def operator_failure(kubectl: Kubectl) -> str | None:
    """Why the operator's pod keeps failing (with its last log lines), or None while it is healthy."""
    for pod in kubectl.json("get", "pods", "-n", RELEASE_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]:
        for container in pod.get("status", {}).get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting", {})
            if container.get("restartCount", 0) >= 2 and waiting.get("reason") in ("CrashLoopBackOff", "Error"):
                logs = kubectl("logs", "-n", RELEASE_NAMESPACE, pod["metadata"]["name"], "--previous", "--tail", "15",
                               check=False)
                return f"the operator pod {pod['metadata']['name']} is in {waiting['reason']}:\n{logs}"
    return None


def wait_ready(kubectl: Kubectl, name: str, namespace: str) -> dict:
    started, last = time.monotonic(), ""
    while time.monotonic() - started < READY_TIMEOUT:
        if problem := operator_failure(kubectl):
            raise RuntimeError(problem)
        model = kubectl.json("get", "inferencemodel", name, "-n", namespace)
        line = describe(model)
        if line != last:
            print(f"[{time.monotonic() - started:5.0f}s] {line}", flush=True)
            last = line
        status = model.get("status", {})
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        if ready.get("status") == "True" and status.get("observedGeneration") == model["metadata"]["generation"]:
            return model
        if status.get("phase") == "Failed":
            raise RuntimeError(f"the model failed: {ready.get('reason')}: {ready.get('message')}")
        time.sleep(2)
    raise RuntimeError(f"not Ready after {READY_TIMEOUT} s: {last}")


def ask(host: str, name: str, model: testmodels.TestModel) -> None:
    import onnxruntime
    import tritonclient.http as httpclient

    batch = np.random.default_rng(2026).standard_normal((4, 3, 32, 32), dtype=np.float32)
    waited = wait_until_routed(host, name)
    if waited >= 1:
        print(f"(the Service routed to the model {waited:.0f} s after Ready: kube-proxy's rules follow its endpoints)")
    triton = httpclient.InferenceServerClient(f"{host}:8000")
    metadata = triton.get_model_metadata(name)
    request = httpclient.InferInput("input", list(batch.shape), "FP32")
    request.set_data_from_numpy(batch, binary_data=True)
    started = time.perf_counter()
    logits = triton.infer(name, [request]).as_numpy("logits")
    elapsed = (time.perf_counter() - started) * 1000
    reference = onnxruntime.InferenceSession(str(model.path)).run(None, {"input": batch})[0]
    print(f"model {metadata['name']} on the Service {host}:8000 answered {logits.shape} logits in {elapsed:.1f} ms")
    for row, served in enumerate(logits):
        print(f"  image {row}: class {int(served.argmax())} (logit {served.max():.4f})")
    diff = float(np.abs(logits - reference).max())
    print(f"max |served - ONNX Runtime on the original model| = {diff:.2e}")
    if not np.allclose(logits, reference, rtol=1e-3, atol=1e-3):
        raise RuntimeError("the served answer differs from the reference")
    print("answer matches the reference: OK")


def main() -> int:
    workdir = REPO_ROOT / ".local" / "quickstart"
    workdir.mkdir(parents=True, exist_ok=True)
    (example,) = load_models(EXAMPLE.read_text(), str(EXAMPLE))
    name, namespace = example.metadata.name, example.metadata.namespace or "default"

    step("plansmith dev-cluster up (first run: a few minutes; later: about a minute)")
    dev = cluster.status() or cluster.up(say=lambda line: print(line, flush=True))
    cluster.refresh_images(dev, say=lambda line: print(line, flush=True))
    kubectl = Kubectl(dev)
    print(kubectl("get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.compute.major"), end="")

    step("helm upgrade --install plansmith charts/plansmith (the operator runs in a pod)")
    install_chart(dev, kubectl)

    step(f"upload a small CNN to {example.spec.model.uri}")
    model = upload_model(dev, example.spec.model.uri, workdir)

    step(f"kubectl apply -f {EXAMPLE.relative_to(REPO_ROOT)}")
    dev.ensure_s3_secret(namespace)
    print(kubectl("apply", "-f", str(EXAMPLE)), end="")

    step("waiting for Ready (build Jobs per GPU type, accuracy gate, engines in S3, serving pods)")
    ready = wait_ready(kubectl, name, namespace)
    print(kubectl("get", "inferencemodels", "-n", namespace), end="")

    step("a real inference request with tritonclient to the Service")
    service = kubectl.json("get", "service", name, "-n", namespace)
    ask(service["spec"]["clusterIP"], name, model)

    step("engine records (status.targets)")
    for target in ready["status"]["targets"]:
        latency = target.get("latency", {})
        print(f"{target.get('gpuProduct')} (compute {target.get('computeCapability')}): engine {target['engineKey']}\n"
              f"  sha256 {target.get('sha256')}  {target.get('backend')} {target.get('backendVersion')}\n"
              f"  accuracy cosine {target.get('accuracy', {}).get('cosine'):.6f}  "
              f"max abs error {target.get('accuracy', {}).get('maxAbsError'):.2e}\n"
              f"  latency p50 {latency.get('p50Ms'):.3f} ms  p99 {latency.get('p99Ms'):.3f} ms  "
              f"throughput {target.get('throughput'):.0f}/s\n  manifest {target.get('engineUri')}")

    host = service["spec"]["clusterIP"]
    print(f"""
Next:
  export KUBECONFIG={dev.kubeconfig}
  kubectl get im {name} -o yaml                      # status, conditions, engine records
  kubectl describe im {name}                         # Events for each transition
  curl -s {host}:8000/v2/models/{name}               # KServe v2 metadata
  curl -s {host}:8000/v2/models/{name}/config        # Triton-style model config
  curl -s {host}:8002/metrics | grep nv_inference    # Triton-named Prometheus metrics
  python -c 'import tritonclient.grpc as g; print(g.InferenceServerClient("{host}:8001").is_model_ready("{name}"))'
  make down                                          # tear it all down
The GPUs of this cluster are simulated: engines are keyed per GPU type and run on the CPU.""")
    return 0


def down() -> int:
    dev = cluster.status()
    if dev is None:
        print("no dev cluster is running")
        return 0
    kubectl = Kubectl(dev)
    kubectl("delete", "-f", str(EXAMPLE), "--ignore-not-found", "--wait=false", check=False)
    subprocess.run([str(helm_binary()), "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--kubeconfig",
                    str(dev.kubeconfig)], capture_output=True, text=True)
    cluster.down(say=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(down() if sys.argv[1:] == ["down"] else main())
