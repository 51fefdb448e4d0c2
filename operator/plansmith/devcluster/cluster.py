"""The dev cluster: a real Kubernetes v1.20.2 cluster whose pods run on this machine.

    control plane   etcd + kube-apiserver (on the node IP, port 16443) + controller-manager + scheduler
    two nodes       containerd + kubelet each, with simulated GPUs of two types (see gpus.py)
    kube-proxy      iptables mode, so ClusterIP Services (and the `kubernetes` Service) work
    S3              moto on the node IP, port 19000, buckets + Secret `plansmith-s3`
    images          pause, python, plansmith/{operator,builder,runtime}:dev imported on each node

`up()` is idempotent; `down()` stops what the state file says `up()` started and undoes its host
changes. State lives in /var/lib/plansmith-dev (PLANSMITH_DEV_STATE moves it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from plansmith.devcluster import host, images
from plansmith.devcluster import node as nodes_module
from plansmith.devcluster.api import Api, ApiError
from plansmith.devcluster.controlplane import ControlPlane, host_address
from plansmith.devcluster.gpus import A10G, H100, status_patch
from plansmith.devcluster.node import NodePaths, NodeSpec
from plansmith.devcluster.processes import Daemon, ServiceFailed, log_tail
from plansmith.devcluster.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server
from plansmith.devcluster.state import ClusterState

log = logging.getLogger(__name__)

API_PORT = 16443
S3_PORT = 19000
KUBE_PROXY_HEALTHZ = "127.0.0.1:20256"
KUBE_PROXY_METRICS = "127.0.0.1:20249"
NODES = (NodeSpec("plansmith-dev-h100", 0, H100), NodeSpec("plansmith-dev-a10g", 1, A10G))
BUCKETS = ("plansmith-models", "plansmith-engines")
S3_SECRET = "plansmith-s3"
SECRET_NAMESPACES = ("default", "plansmith-system")
RUN_DIR = Path("/run/plansmith-dev")


def state_dir() -> Path:
    return Path(os.environ.get("PLANSMITH_DEV_STATE", "/var/lib/plansmith-dev"))


@dataclass(frozen=True)
class DevCluster:
    """A running dev cluster, as the state file describes it."""

    root: Path
    state: ClusterState

    @property
    def kubeconfig(self) -> Path:
        return Path(self.state.kubeconfig)

    @property
    def kubectl(self) -> Path:
        return Path(self.state.kubectl)

    @property
    def s3_endpoint(self) -> str:
        return self.state.s3_endpoint

    @property
    def node_ip(self) -> str:
        return self.state.node_ip

    def s3_credentials(self) -> dict[str, str]:
        return s3_secret_data(self.state.s3_endpoint)

    def api(self) -> Api:
        return admin_api(self.root, self.state)

    def ensure_s3_secret(self, namespace: str) -> None:
        """The `plansmith-s3` Secret (creating the namespace if needed), for tests' own namespaces."""
        self.api().apply_secret(namespace, S3_SECRET, self.s3_credentials())

    def node_paths(self, name: str) -> NodePaths:
        return paths_for(self.root, name)


def paths_for(root: Path, node_name: str) -> NodePaths:
    return NodePaths(root / "nodes" / node_name, RUN_DIR / node_name)


def state_file(root: Path) -> Path:
    return root / "state.json"


def admin_api(root: Path, state: ClusterState) -> Api:
    config = json.loads(Path(state.kubeconfig).read_text())
    return Api(state.api_server, root / "control-plane" / "pki" / "ca.crt", config["users"][0]["user"]["token"])


def s3_secret_data(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": endpoint, "endpoint": endpoint}


def status(root: Path | None = None) -> DevCluster | None:
    """The running cluster, or None when none is up (or a part of it died)."""
    root = root or state_dir()
    state = ClusterState.load(state_file(root))
    if state is None or not state.complete or not state.all_alive():
        return None
    return DevCluster(root, state)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One `up`/`down`/`load-image` at a time per state folder (parallel test sessions share it)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def _timed(state: ClusterState, step: str, say: Callable[[str], None]) -> Iterator[None]:
    started = time.monotonic()
    say(f"... {step}")
    yield
    state.timings[step] = round(time.monotonic() - started, 1)
    say(f"    {step}: {state.timings[step]:.1f} s")


def up(root: Path | None = None, *, plansmith_images: bool = True, say: Callable[[str], None] = print) -> DevCluster:
    """Start the cluster (or return the running one). On failure, undo what was started and raise."""
    root = root or state_dir()
    if os.geteuid() != 0:
        raise host.HostSetupFailed("the dev cluster needs root (containerd, cgroups, iptables, mounts)")
    with _locked(root):
        return _up(root, plansmith_images=plansmith_images, say=say)


def _up(root: Path, *, plansmith_images: bool, say: Callable[[str], None]) -> DevCluster:
    running = status(root)
    if running:
        say(f"dev cluster already up; kubeconfig {running.kubeconfig}")
        return running
    if ClusterState.load(state_file(root)) is not None:
        say("a previous dev cluster is partly up or was not stopped: cleaning it first")
        _down(root, say=say)
    root.mkdir(parents=True, exist_ok=True)
    state = ClusterState()
    started = time.monotonic()
    try:
        _bring_up(root, state, plansmith_images=plansmith_images, say=say)
    except BaseException:
        say("bring-up failed; stopping what was started (logs stay in " + str(root / "logs-failed") + ")")
        _keep_logs(root)
        _down(root, say=lambda _: None)
        raise
    state.timings["total"] = round(time.monotonic() - started, 1)
    state.complete = True
    state.save(state_file(root))
    cluster = DevCluster(root, state)
    say(summary(cluster))
    return cluster


def _keep_logs(root: Path) -> None:
    target = root / "logs-failed"
    shutil.rmtree(target, ignore_errors=True)
    for log_file in root.rglob("*.log"):
        if target in log_file.parents:
            continue
        destination = target / log_file.relative_to(root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log_file, destination)


def _bring_up(root: Path, state: ClusterState, *, plansmith_images: bool, say: Callable[[str], None]) -> None:
    save = lambda: state.save(state_file(root))  # noqa: E731 - saved after every step: down() can undo a half-up
    missing = host.missing_packages()
    if missing:
        with _timed(state, f"apt-get install {' '.join(missing)} (first up on this machine)", say):
            host.install_packages(missing)

    state.node_ip = host_address()
    state.sysctls = host.read_sysctls()
    state.hostport_chains_existed = bool(host.existing_chains() & set(host.HOSTPORT_CHAINS))
    state.iptables_chains_before = host.chain_snapshot()
    state.created_paths = host.ensure_dirs(nodes_module.PRIVATE_HOST_PATHS)
    save()
    failed = host.write_sysctls(host.SYSCTLS_SET)
    if "net.ipv4.ip_forward" in failed:
        raise host.HostSetupFailed("cannot enable net.ipv4.ip_forward: pods could not reach the host")

    users = {spec.user: ("system:nodes",) for spec in NODES}
    users["system:kube-proxy"] = ()
    with _timed(state, "control plane (etcd, kube-apiserver, controller-manager, scheduler)", say):
        plane = ControlPlane(root / "control-plane", bind_address=state.node_ip, api_port=API_PORT, extra_users=users)
        try:
            plane.start()
        finally:
            for daemon in plane.daemons:
                state.add(daemon.name, daemon.pid, str(daemon.log))
            save()
    state.api_server, state.kubeconfig, state.kubectl = plane.server, str(plane.kubeconfig), str(plane.kubectl)
    save()
    api = Api(plane.server, plane.ca_cert, plane.tokens["admin"])

    with _timed(state, "images (pause, python, plansmith; cached by content)", say):
        archives = [images.pause_archive(), images.python_archive()]
        if plansmith_images:
            archives.append(images.plansmith_archive())
            state.images_source = images.source_digest()

    with _timed(state, f"containerd on {len(NODES)} nodes + image import", say):
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        containerd_pids = {}
        for spec in NODES:
            paths = paths_for(root, spec.name)
            nodes_module.write_node_files(spec, paths, node_ip=state.node_ip, client_ca=plane.ca_cert,
                                          pause_image=images.PAUSE_REF)
            plane.user_kubeconfig(spec.user, paths.kubeconfig)
            daemon = nodes_module.start_containerd(paths)
            state.add(f"containerd/{spec.name}", daemon.pid, str(daemon.log))
            containerd_pids[spec.name] = daemon.pid
            save()
        with ThreadPoolExecutor(len(NODES)) as pool:
            for done in [pool.submit(_import_all, paths_for(root, spec.name), archives) for spec in NODES]:
                done.result()

    with _timed(state, "kubelets -> nodes Ready", say):
        kubelet_bin = plane.bin / "kubelet"
        for spec in NODES:
            nodes_module.prepare_cgroups(spec)
            daemon = nodes_module.start_kubelet(spec, paths_for(root, spec.name), kubelet=kubelet_bin,
                                                node_ip=state.node_ip, pause_image=images.PAUSE_REF,
                                                containerd_pid=containerd_pids[spec.name])
            state.add(f"kubelet/{spec.name}", daemon.pid, str(daemon.log))
            state.nodes.append(spec.name)
            save()
        for spec in NODES:
            kubelet = _Watched(f"kubelet/{spec.name}", state)
            kubelet.wait_until(lambda name=spec.name: api.node_ready(name), 120, f"node {spec.name} Ready")

    with _timed(state, "simulated GPUs (status capacity + GFD labels)", say):
        for spec in NODES:
            if spec.gpus:
                api.request("PATCH", f"/api/v1/nodes/{spec.name}/status", status_patch(spec.gpus),
                            content_type="application/json-patch+json")
                api.request("PATCH", f"/api/v1/nodes/{spec.name}", {"metadata": {"labels": spec.gpus.labels()}},
                            content_type="application/merge-patch+json")

    with _timed(state, "kube-proxy (iptables mode)", say):
        proxy_config = plane.user_kubeconfig("system:kube-proxy", root / "kube-proxy.kubeconfig")
        proxy = Daemon("kube-proxy", [
            str(plane.bin / "kube-proxy"), f"--kubeconfig={proxy_config}", f"--hostname-override={NODES[0].name}",
            "--proxy-mode=iptables", f"--cluster-cidr={nodes_module.POD_NETWORK}",
            f"--healthz-bind-address={KUBE_PROXY_HEALTHZ}", f"--metrics-bind-address={KUBE_PROXY_METRICS}",
            # leave the host's conntrack sysctls alone
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0", "--v=1",
        ], root / "logs" / "kube-proxy.log").start()
        state.add("kube-proxy", proxy.pid, str(proxy.log))
        save()
        proxy.wait_until(lambda: "KUBE-SERVICES" in host.existing_chains("nat"), 60, "its iptables chains")

    with _timed(state, "S3 (moto) + buckets + Secret plansmith-s3", say):
        s3 = S3Server(root, host=state.node_ip, port=S3_PORT)
        try:
            s3.start()
        finally:
            if s3.daemon:
                state.add("moto_server", s3.daemon.pid, str(s3.daemon.log))
                save()
        state.s3_endpoint = s3.endpoint
        _create_buckets(s3)
        for namespace in SECRET_NAMESPACES:
            api.apply_secret(namespace, S3_SECRET, s3_secret_data(s3.endpoint))
    save()


class _Watched:
    """wait_until for a process recorded by pid (its Popen may belong to this or another process)."""

    def __init__(self, name: str, state: ClusterState):
        self.record = state.process(name)
        self.name = name

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.record is None or not self.record.alive():
                raise ServiceFailed(f"{self.name} exited waiting for {what}; log:\n"
                                    f"{log_tail(Path(self.record.log)) if self.record else ''}")
            if ready():
                return
            time.sleep(0.5)
        raise ServiceFailed(f"{self.name}: timed out after {timeout:.0f}s waiting for {what}; log:\n"
                            f"{log_tail(Path(self.record.log))}")


def _import_all(paths: NodePaths, archives: list[Path]) -> None:
    for archive in archives:
        nodes_module.import_image(paths, archive)


def _create_buckets(s3: S3Server) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY)
    for bucket in BUCKETS:
        client.create_bucket(Bucket=bucket)


def load_image(root: Path | None = None, *, say: Callable[[str], None] = print) -> list[str]:
    """Rebuild the plansmith images from the working tree (only the source layer changes) and
    import them on every node. Returns the image names."""
    root = root or state_dir()
    with _locked(root):
        return _load_image(root, say=say)


def _load_image(root: Path, *, say: Callable[[str], None]) -> list[str]:
    cluster = status(root)
    if cluster is None:
        raise ServiceFailed("no dev cluster is up: run `plansmith dev-cluster up` first")
    started = time.monotonic()
    archive = images.plansmith_archive()
    built = time.monotonic()
    with ThreadPoolExecutor(len(cluster.state.nodes)) as pool:
        for done in [pool.submit(nodes_module.import_image, cluster.node_paths(n), archive) for n in cluster.state.nodes]:
            done.result()
    cluster.state.images_source = images.source_digest()
    cluster.state.save(state_file(cluster.root))
    names = [image.ref for image in images.PLANSMITH_IMAGES.values()]
    say(f"built in {built - started:.1f} s, imported on {len(cluster.state.nodes)} nodes in "
        f"{time.monotonic() - built:.1f} s: {', '.join(names)}")
    return names


def refresh_images(cluster: DevCluster, *, say: Callable[[str], None] = print) -> bool:
    """load_image() when the working tree changed since the plansmith images were imported."""
    if cluster.state.images_source == images.source_digest():
        return False
    load_image(cluster.root, say=say)
    return True


def down(root: Path | None = None, *, say: Callable[[str], None] = print) -> None:
    """Stop what `up` started (by recorded pid) and undo its host changes. Safe to repeat."""
    root = root or state_dir()
    with _locked(root):
        _down(root, say=say)


def _down(root: Path, *, say: Callable[[str], None]) -> None:
    state = ClusterState.load(state_file(root))
    if state is None:
        say(f"no dev cluster state in {root}: nothing to stop")
        return
    specs = [spec for spec in NODES if spec.name in state.nodes or state.process(f"containerd/{spec.name}")]
    apiserver, kubelets = state.process("kube-apiserver"), [state.process(f"kubelet/{s.name}") for s in specs]
    if apiserver and apiserver.alive() and kubelets and all(k and k.alive() for k in kubelets):
        _delete_workloads(root, state, specs, say)

    def stop(name: str, grace: float = 10) -> None:
        record = state.process(name)
        if record and record.alive():
            began = time.monotonic()
            killed = record.stop(grace)
            say(f"stopped {name} (pid {record.pid}){' with SIGKILL' if killed else ''} in {time.monotonic() - began:.1f} s")

    stop("kube-proxy")
    for spec in specs:
        stop(f"kubelet/{spec.name}", 20)
    for spec in specs:
        paths = paths_for(root, spec.name)
        if paths.socket.exists():
            nodes_module.kill_all_tasks(paths)
        stop(f"containerd/{spec.name}", 15)
        _kill_leftover_shims(paths, say)
    for name in ("moto_server", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        stop(name)

    kube_proxy = Path(state.kubectl).with_name("kube-proxy") if state.kubectl else None
    if kube_proxy and kube_proxy.exists():
        subprocess.run([str(kube_proxy), "--cleanup"], capture_output=True)
    removed = host.remove_cni_rules([s.cni_network for s in NODES],
                                    remove_hostport_chains=not state.hostport_chains_existed)
    if state.iptables_chains_before:
        chains = host.remove_new_chains(state.iptables_chains_before)
        if chains:
            say(f"removed iptables chains {', '.join(chains)}")
    for spec in NODES:
        if nodes_module.delete_bridge(spec):
            say(f"deleted bridge {spec.bridge}")
        stayed = nodes_module.remove_cgroups(spec)
        if stayed:
            say(f"WARNING: cgroups left behind: {', '.join(stayed)}")
    if removed:
        say(f"removed {removed} iptables rule(s) of the pod networks")
    failed = host.write_sysctls(state.sysctls)
    if failed:
        say(f"WARNING: could not restore sysctls {', '.join(failed)}")
    host.remove_if_empty(state.created_paths)
    for folder in [RUN_DIR, root / "nodes", root / "control-plane", root / "logs"]:
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in ("kube-proxy.kubeconfig", "state.json"):
        (root / leftover).unlink(missing_ok=True)
    say(f"dev cluster stopped; state removed from {root}")


def _delete_workloads(root: Path, state: ClusterState, specs: list[NodeSpec], say: Callable[[str], None]) -> None:
    """Delete every pod through the API so each kubelet tears its sandboxes (and CNI) down cleanly."""
    api = admin_api(root, state)
    try:
        namespaces = [n["metadata"]["name"] for n in api.get("/api/v1/namespaces")["items"]]
        for namespace in namespaces:
            for group, kinds in (("apis/apps/v1", ("deployments", "replicasets", "statefulsets", "daemonsets")),
                                 ("apis/batch/v1", ("jobs",))):
                for kind in kinds:
                    api.request("DELETE", f"/{group}/namespaces/{namespace}/{kind}",
                                {"propagationPolicy": "Background"})
            api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods", {"gracePeriodSeconds": 0})
    except (ApiError, OSError) as error:
        say(f"could not delete workloads through the API ({error}); killing containers directly")
        return
    started = time.monotonic()
    while time.monotonic() < started + 45:
        if not any(nodes_module.running_tasks(paths_for(root, s.name)) for s in specs):
            time.sleep(2)  # the kubelet's StopPodSandbox (CNI DEL) follows the last task
            break
        time.sleep(1)
    say(f"deleted the cluster's pods through the API ({time.monotonic() - started:.0f} s)")


def _kill_leftover_shims(paths: NodePaths, say: Callable[[str], None]) -> None:
    """containerd-shim processes of this node (their command line names our private socket)."""
    marker = str(paths.socket).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                say(f"killed leftover shim {proc.name}")
            except ProcessLookupError:
                pass


def summary(cluster: DevCluster) -> str:
    state = cluster.state
    lines = [
        "dev cluster up (Kubernetes v1.20.2; GPUs are SIMULATED, engines build with onnxruntime on CPU)",
        f"  kubeconfig   {state.kubeconfig}",
        f"  kubectl      {state.kubectl} --kubeconfig {state.kubeconfig}",
        f"  API server   {state.api_server}",
        f"  S3 endpoint  {state.s3_endpoint}  buckets {', '.join(BUCKETS)}; Secret {S3_SECRET} in "
        f"{', '.join(SECRET_NAMESPACES)}",
        f"  nodes        " + ", ".join(f"{s.name} ({s.gpus.count} x {s.gpus.product})" if s.gpus else s.name
                                      for s in NODES if s.name in state.nodes),
        "  images       " + ", ".join([images.PAUSE_REF, images.PYTHON_REF]
                                      + [i.ref for i in images.PLANSMITH_IMAGES.values()]),
        "  processes    " + ", ".join(f"{p.name}={p.pid}" for p in state.processes),
        "  timings      " + "; ".join(f"{k}: {v:.0f} s" for k, v in state.timings.items()),
    ]
    return "\n".join(lines)
