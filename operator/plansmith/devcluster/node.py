"""One node of the dev cluster: containerd (private socket, state and root) + the kubelet, with a
bridge CNI network of its own and a private cgroup root.

Both processes run in a private mount namespace in which /var/log/pods, /var/log/containers and
/var/lib/kubelet are bind mounts of the node's own folders. kubelet v1.20 hard-codes those paths,
and its garbage collector deletes every /var/log/pods entry of a pod it does not know: two kubelets
sharing them would delete each other's logs. The namespace also takes every container and netns
mount with it when the node stops, and keeps the host's paths untouched.

The render_* functions are pure (configuration text from a NodeSpec); start_node is the adapter.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from plansmith.devcluster.gpus import GpuProfile
from plansmith.devcluster.processes import Daemon, ServiceFailed

CNI_BIN_DIR = "/usr/lib/cni"
CGROUP_FS = Path("/sys/fs/cgroup")
PRIVATE_HOST_PATHS = ("/var/log/pods", "/var/log/containers", "/var/lib/kubelet")
POD_NETWORK = "10.222.0.0/16"  # node i gets 10.222.i.0/24


@dataclass(frozen=True)
class NodeSpec:
    name: str
    index: int
    gpus: GpuProfile | None = None

    @property
    def pod_subnet(self) -> str:
        return f"10.222.{self.index}.0/24"

    @property
    def bridge(self) -> str:
        return f"psdev{self.index}"

    @property
    def cni_network(self) -> str:
        return f"plansmith-dev-{self.index}"

    @property
    def kubelet_port(self) -> int:
        return 20250 + 10 * self.index

    @property
    def kubelet_healthz_port(self) -> int:
        return 20248 + 10 * self.index

    @property
    def cgroup_root(self) -> str:
        return f"plansmith-dev-{self.index}"

    @property
    def user(self) -> str:
        """The kubelet's identity (the Node authorizer and NodeRestriction key on it)."""
        return f"system:node:{self.name}"


@dataclass(frozen=True)
class NodePaths:
    home: Path  # <state>/nodes/<name>: persistent-ish node state
    run: Path  # /run/plansmith-dev/<name>: sockets (short paths) and runtime state

    @property
    def socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.home / "containerd.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.home / "cni"

    @property
    def kubelet_config(self) -> Path:
        return self.home / "kubelet.json"

    @property
    def kubeconfig(self) -> Path:
        return self.home / "kubelet.kubeconfig"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def private(self, host_path: str) -> Path:
        """The node's own folder bind-mounted over `host_path` in its mount namespace."""
        return self.home / "private" / host_path.strip("/").replace("/", "-")


def render_containerd_config(paths: NodePaths, pause_image: str) -> str:
    return f"""version = 2
root = "{paths.home / 'containerd'}"
state = "{paths.run / 'state'}"
[grpc]
  address = "{paths.socket}"
[ttrpc]
  address = "{paths.socket}.ttrpc"
[debug]
  address = "{paths.run / 'debug.sock'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{paths.home / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  # this VM lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (-998 for sandboxes); clamp it
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{paths.run / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{paths.cni_conf_dir}"
"""


def render_cni_conflist(spec: NodeSpec, paths: NodePaths) -> str:
    return json.dumps({
        "cniVersion": "0.4.0",
        "name": spec.cni_network,
        "plugins": [
            {"type": "bridge", "bridge": spec.bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": spec.pod_subnet}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(paths.run / "cni-ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=2)


def render_kubelet_config(spec: NodeSpec, node_ip: str, client_ca: Path) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{spec.cgroup_root}",
        "failSwapOn": False,
        "oomScoreAdj": 0,  # CAP_SYS_RESOURCE is missing here; -999 would only log errors
        "makeIPTablesUtilChains": False,
        "address": node_ip,
        "port": spec.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": spec.kubelet_healthz_port,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(client_ca)}},
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        # a shared developer machine: never evict pods for the host's disk or memory use
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 60,
        # memory-backed emptyDirs (a serving pod's sized /dev/shm) mounted with their sizeLimit as the
        # tmpfs size, as kubelets >= 1.22 do by default (this v1.20 kubelet has the gate, off)
        "featureGates": {"SizeMemoryBackedVolumes": True},
    }
    return json.dumps(config, indent=2)


def prepare_cgroups(spec: NodeSpec) -> None:
    """The kubelet needs its cgroup root to exist in every v1 hierarchy; cpuset needs cpus/mems."""
    for hierarchy in CGROUP_FS.iterdir():
        if not hierarchy.is_dir() or hierarchy.name == "unified" or not (hierarchy / "cgroup.procs").exists():
            continue
        root = hierarchy / spec.cgroup_root
        root.mkdir(exist_ok=True)
        for seeded in ("cpuset.cpus", "cpuset.mems"):
            if (root / seeded).exists() and not (root / seeded).read_text().strip():
                (root / seeded).write_text((hierarchy / seeded).read_text())


def remove_cgroups(spec: NodeSpec) -> list[str]:
    """Remove the node's cgroup root everywhere (deepest first); returns the ones that stayed."""
    stayed = []
    for hierarchy in CGROUP_FS.iterdir():
        root = hierarchy / spec.cgroup_root
        if not root.is_dir():
            continue
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            stayed.append(str(root))
    return stayed


def write_node_files(spec: NodeSpec, paths: NodePaths, *, node_ip: str, client_ca: Path, pause_image: str) -> None:
    for folder in (paths.home, paths.run, paths.cni_conf_dir, paths.logs):
        folder.mkdir(parents=True, exist_ok=True)
    for host_path in PRIVATE_HOST_PATHS:
        paths.private(host_path).mkdir(parents=True, exist_ok=True)
    paths.containerd_config.write_text(render_containerd_config(paths, pause_image))
    (paths.cni_conf_dir / "10-plansmith-dev.conflist").write_text(render_cni_conflist(spec, paths))
    paths.kubelet_config.write_text(render_kubelet_config(spec, node_ip, client_ca))


def start_containerd(paths: NodePaths) -> Daemon:
    """containerd in a new private mount namespace with the node's private host paths bound in."""
    binds = "; ".join(f"mount --bind {shlex.quote(str(paths.private(p)))} {p}" for p in PRIVATE_HOST_PATHS)
    script = f"set -e; {binds}; exec containerd --config {shlex.quote(str(paths.containerd_config))}"
    daemon = Daemon("containerd", ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                    paths.logs / "containerd.log").start()
    daemon.wait_until(lambda: ctr(paths, "version").returncode == 0, 60, "the containerd socket")
    return daemon


def start_kubelet(spec: NodeSpec, paths: NodePaths, *, kubelet: Path, node_ip: str, pause_image: str,
                  containerd_pid: int) -> Daemon:
    """The kubelet, entering containerd's mount namespace (nsenter execs: the pid is the kubelet's)."""
    return Daemon("kubelet", [
        "nsenter", f"--mount=/proc/{containerd_pid}/ns/mnt", "--",
        str(kubelet), f"--config={paths.kubelet_config}", f"--kubeconfig={paths.kubeconfig}",
        "--container-runtime=remote", f"--container-runtime-endpoint=unix://{paths.socket}",
        f"--image-service-endpoint=unix://{paths.socket}", f"--pod-infra-container-image={pause_image}",
        f"--hostname-override={spec.name}", f"--node-ip={node_ip}",
        "--root-dir=/var/lib/kubelet", f"--cert-dir={paths.home / 'kubelet-pki'}", "--v=1",
    ], paths.logs / "kubelet.log").start()


def ctr(paths: NodePaths, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["ctr", "--address", str(paths.socket), "--namespace", "k8s.io", *args],
                          capture_output=True, text=True, timeout=timeout)


def import_image(paths: NodePaths, archive: Path) -> None:
    """Import an OCI archive into the node's containerd (k8s.io namespace, unpacked for overlayfs)."""
    result = ctr(paths, "images", "import", str(archive))
    if result.returncode != 0:
        raise ServiceFailed(f"ctr images import {archive} failed:\n{result.stderr[-2000:]}")


def running_tasks(paths: NodePaths) -> list[str]:
    result = ctr(paths, "tasks", "ls", "-q", timeout=30)
    return result.stdout.split() if result.returncode == 0 else []


def kill_all_tasks(paths: NodePaths) -> None:
    """Last resort when the kubelet could not stop its pods: SIGKILL every task, remove containers."""
    for task in running_tasks(paths):
        ctr(paths, "tasks", "kill", "--signal", "SIGKILL", task, timeout=30)
    time.sleep(1)
    for task in running_tasks(paths):
        ctr(paths, "tasks", "delete", "--force", task, timeout=30)
    listed = ctr(paths, "containers", "ls", "-q", timeout=30)
    for container in listed.stdout.split():
        ctr(paths, "containers", "delete", container, timeout=30)


def delete_bridge(spec: NodeSpec) -> bool:
    if subprocess.run(["ip", "link", "show", spec.bridge], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "link", "delete", spec.bridge], capture_output=True)
    return True

