"""A real Kubernetes v1.20.2 control plane on loopback: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, with RBAC and token authentication. No kubelet: that is the dev cluster's job.

    plane = ControlPlane(workdir).start()
    ... use plane.kubeconfig ...
    plane.stop()
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import ssl
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from plansmith.devcluster import pki as pki_module
from plansmith.devcluster.binaries import etcd_binary, kubernetes_bin_dir
from plansmith.devcluster.processes import Daemon, free_port

SERVICE_CIDR = "10.0.0.0/24"


def host_address() -> str:
    """A non-loopback address of this host: the API server advertises it (loopback makes the
    `kubernetes` Service endpoints invalid). Falls back to loopback on a host without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP sends nothing
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def write_kubeconfig(path: Path, *, server: str, ca: Path, user: str, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "plansmith-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "plansmith-dev", "context": {"cluster": "plansmith-dev", "user": user}}],
        "current-context": "plansmith-dev",
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML; no yaml dependency needed here
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    workdir: Path
    bind_address: str = "127.0.0.1"
    api_port: int = field(default_factory=free_port)
    daemons: list[Daemon] = field(default_factory=list)
    # more token users, name -> groups (the dev cluster adds its kubelets and kube-proxy)
    extra_users: dict[str, tuple[str, ...]] = field(default_factory=dict)
    etcd_endpoint: str = field(default="", init=False)  # set by start()

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.bin = kubernetes_bin_dir()
        self.advertise_address = host_address()
        self.tokens = {user: secrets.token_hex(16) for user in ("admin", "controller-manager", "scheduler")}
        self.tokens.update({user: secrets.token_hex(16) for user in self.extra_users})

    @property
    def server(self) -> str:
        return f"https://{self.bind_address}:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def kubectl(self) -> Path:
        return self.bin / "kubectl"

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    def user_kubeconfig(self, user: str, path: Path) -> Path:
        """A kubeconfig for one of `extra_users` (written after start())."""
        return write_kubeconfig(path, server=self.server, ca=self.ca_cert, user=user, token=self.tokens[user])

    def _get(self, path: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.tokens['admin']}"})
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.read()

    def start(self) -> "ControlPlane":
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        keys = pki_module.generate(self.workdir / "pki", extra_ips=[self.advertise_address, self.bind_address])
        token_file = self.workdir / "tokens.csv"
        token_file.write_text(
            f'{self.tokens["admin"]},admin,admin,"system:masters"\n'
            f'{self.tokens["controller-manager"]},system:kube-controller-manager,kcm\n'
            f'{self.tokens["scheduler"]},system:kube-scheduler,scheduler\n'
            + "".join(f'{self.tokens[user]},{user},{user}' + (f',"{",".join(groups)}"' if groups else "") + "\n"
                      for user, groups in self.extra_users.items())
        )
        token_file.chmod(0o600)
        write_kubeconfig(self.kubeconfig, server=self.server, ca=keys.ca_cert, user="admin", token=self.tokens["admin"])
        kcm_config = write_kubeconfig(self.workdir / "controller-manager.kubeconfig", server=self.server,
                                      ca=keys.ca_cert, user="kcm", token=self.tokens["controller-manager"])
        sched_config = write_kubeconfig(self.workdir / "scheduler.kubeconfig", server=self.server,
                                        ca=keys.ca_cert, user="scheduler", token=self.tokens["scheduler"])

        etcd_port, etcd_peer = free_port(), free_port()
        self.etcd_endpoint = f"http://127.0.0.1:{etcd_port}"
        etcd_data = self.workdir / "etcd"
        shutil.rmtree(etcd_data, ignore_errors=True)
        etcd = Daemon("etcd", [
            str(etcd_binary()), "--name", "plansmith-dev", "--data-dir", str(etcd_data),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"plansmith-dev=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",
        ], logs / "etcd.log").start()
        self.daemons.append(etcd)

        apiserver = Daemon("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--secure-port={self.api_port}", f"--bind-address={self.bind_address}",
            f"--advertise-address={self.advertise_address}",
            f"--tls-cert-file={keys.apiserver_cert}", f"--tls-private-key-file={keys.apiserver_key}",
            f"--client-ca-file={keys.ca_cert}",
            f"--kubelet-client-certificate={keys.kubelet_client_cert}",
            f"--kubelet-client-key={keys.kubelet_client_key}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={keys.service_account_pub}",
            f"--service-account-signing-key-file={keys.service_account_key}",
            "--authorization-mode=Node,RBAC", f"--token-auth-file={token_file}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--enable-admission-plugins=NodeRestriction",
            f"--audit-log-path={logs / 'audit.log'}",
            f"--audit-policy-file={self._audit_policy()}",
            "--audit-log-maxsize=200",
        ], logs / "kube-apiserver.log").start()
        self.daemons.append(apiserver)
        apiserver.wait_until(lambda: self._get("/readyz") == b"ok", 120, "/readyz")

        kcm = Daemon("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), f"--kubeconfig={kcm_config}",
            f"--service-account-private-key-file={keys.service_account_key}",
            f"--root-ca-file={keys.ca_cert}", "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={keys.ca_cert}", f"--cluster-signing-key-file={keys.ca_key}",
            "--controllers=*,bootstrapsigner,tokencleaner", "--leader-elect=false",
            "--port=0", f"--secure-port={free_port()}", "--bind-address=127.0.0.1",
        ], logs / "kube-controller-manager.log").start()
        self.daemons.append(kcm)
        scheduler = Daemon("kube-scheduler", [
            str(self.bin / "kube-scheduler"), f"--kubeconfig={sched_config}", "--leader-elect=false",
            "--port=0", f"--secure-port={free_port()}", "--bind-address=127.0.0.1",
        ], logs / "kube-scheduler.log").start()
        self.daemons.append(scheduler)
        # the token controller of kube-controller-manager creates this once it runs
        kcm.wait_until(lambda: bool(self._get("/api/v1/namespaces/default/serviceaccounts/default")), 90,
                       "the default ServiceAccount")
        return self

    def _audit_policy(self) -> Path:
        """Record who called which verb on which resource (metadata only): the RBAC tests read it."""
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                      "omitStages": ["RequestReceived"], "rules": [{"level": "Metadata"}]}))
        return policy

    def restart_api_server(self, down_seconds: float = 0.0, *, compact_history: bool = False) -> None:
        """Stop kube-apiserver, leave it down for `down_seconds`, and start it again with the same flags
        (etcd keeps the data): what clients see during an upgrade or a crash of the API server. With
        `compact_history`, etcd forgets every revision before the current one meanwhile, so a watch
        resumed from an earlier resourceVersion gets 410 Gone, as after a long disconnection."""
        apiserver = next(d for d in self.daemons if d.name == "kube-apiserver")
        apiserver.stop()
        if compact_history:
            self._compact_etcd()
        time.sleep(down_seconds)
        apiserver.start()
        apiserver.wait_until(lambda: self._get("/readyz") == b"ok", 120, "/readyz after a restart")

    def _compact_etcd(self) -> None:
        """Compact etcd up to its current revision, through etcd's v3 JSON gateway (no etcdctl needed)."""
        def call(path: str, body: dict) -> dict:
            request = urllib.request.Request(self.etcd_endpoint + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        revision = call("/v3/kv/range", {"key": "AA==", "range_end": "AA==", "count_only": True})["header"]["revision"]
        call("/v3/kv/compaction", {"revision": revision, "physical": True})

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons.clear()
