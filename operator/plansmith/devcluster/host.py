"""What the dev cluster changes on the host, and how it puts it back: Debian packages it installs
(left installed), sysctls (restored), iptables rules and chains (removed), folders (removed when
empty and created by us)."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "debootstrap",
                   "gcc", "libc6-dev", "util-linux", "iproute2", "etcd-server")
# ip_forward and bridge-nf-call-iptables are ours (pods <-> host, Services between pods of a
# bridge); the others are set by kubelet v1.20 and kube-proxy at start-up
SYSCTLS_SET = {"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1"}
SYSCTLS_TOUCHED = ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables", "kernel.panic", "kernel.panic_on_oops",
                   "vm.overcommit_memory", "vm.panic_on_oom", "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
                   "net.ipv4.conf.all.route_localnet")
HOSTPORT_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")


class HostSetupFailed(RuntimeError):
    """A host package could not be installed or a host setting could not be changed."""


def missing_packages(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> list[str]:
    missing = []
    for package in packages:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if "ok installed" not in result.stdout:
            missing.append(package)
    return missing


def install_packages(packages: list[str]) -> float:
    """apt-get install `packages` (only those); returns the seconds it took."""
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # stale package lists on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise HostSetupFailed(f"apt-get install {' '.join(packages)} failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_sysctls(keys: tuple[str, ...] = SYSCTLS_TOUCHED) -> dict[str, str]:
    found = {}
    for key in keys:
        try:
            found[key] = _sysctl_path(key).read_text().strip()
        except OSError:
            continue
    return found


def write_sysctls(values: dict[str, str]) -> list[str]:
    """Set each value; returns the keys that could not be written."""
    failed = []
    for key, value in values.items():
        try:
            _sysctl_path(key).write_text(value)
        except OSError:
            failed.append(key)
    return failed


def iptables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)


def existing_chains(table: str = "nat") -> set[str]:
    result = iptables("-t", table, "-S")
    return {line.split()[1] for line in result.stdout.splitlines() if line.startswith("-N ")}


OUR_CHAIN_PREFIXES = ("KUBE-", "CNI-")
TABLES = ("nat", "filter", "mangle")


def chain_snapshot() -> dict[str, list[str]]:
    """The KUBE-*/CNI-* chains that exist now, per table (those are left alone by cleanup)."""
    return {table: sorted(c for c in existing_chains(table) if c.startswith(OUR_CHAIN_PREFIXES)) for table in TABLES}


def remove_new_chains(before: dict[str, list[str]]) -> list[str]:
    """Remove KUBE-*/CNI-* chains that did not exist in `before` (rules jumping to them first)."""
    removed = []
    for table in TABLES:
        new = {c for c in existing_chains(table) if c.startswith(OUR_CHAIN_PREFIXES)} - set(before.get(table, []))
        if not new:
            continue
        for line in iptables("-t", table, "-S").stdout.splitlines():
            words = shlex.split(line)
            if words[:1] == ["-A"] and "-j" in words and words[words.index("-j") + 1] in new:
                iptables("-t", table, "-D", *words[1:])
        for chain in new:
            iptables("-t", table, "-F", chain)
        for chain in new:
            if iptables("-t", table, "-X", chain).returncode == 0:
                removed.append(f"{table}/{chain}")
    return removed


def remove_cni_rules(network_names: list[str], *, remove_hostport_chains: bool) -> int:
    """Delete the bridge plugin's masquerade rules (tagged `name: "<network>"`) and their chains,
    and the portmap plugin's chains when they did not exist before the cluster. Returns rules removed."""
    removed = 0
    rules = iptables("-t", "nat", "-S", "POSTROUTING").stdout.splitlines()
    for rule in rules:
        if not any(f'name: \\"{name}\\"' in rule or f'name: "{name}"' in rule for name in network_names):
            continue
        chain = re.search(r"-j (CNI-[0-9a-f]+)", rule)
        # the rule text is shell-quoted by iptables -S: split it back the same way
        words = shlex.split(rule)
        if iptables("-t", "nat", "-D", *words[1:]).returncode == 0:
            removed += 1
        if chain:
            iptables("-t", "nat", "-F", chain.group(1))
            iptables("-t", "nat", "-X", chain.group(1))
    if remove_hostport_chains:
        for line in iptables("-t", "nat", "-S").stdout.splitlines():
            if line.startswith("-A ") and any(f"-j {c}" in line for c in HOSTPORT_CHAINS):
                iptables("-t", "nat", "-D", *shlex.split(line)[1:])
        for chain in HOSTPORT_CHAINS:
            iptables("-t", "nat", "-F", chain)
            iptables("-t", "nat", "-X", chain)
    for table in ("mangle", "nat", "filter"):
        iptables("-t", table, "-F", "KUBE-KUBELET-CANARY")
        iptables("-t", table, "-X", "KUBE-KUBELET-CANARY")
    return removed


def ensure_dirs(paths: tuple[str, ...]) -> list[str]:
    """Create the folders that do not exist yet; returns the ones created (to remove them later)."""
    created = []
    for path in paths:
        if not os.path.exists(path):
            os.makedirs(path)
            created.append(path)
    return created


def remove_if_empty(paths: list[str]) -> None:
    for path in sorted(paths, key=len, reverse=True):
        try:
            os.rmdir(path)
        except OSError:
            pass
