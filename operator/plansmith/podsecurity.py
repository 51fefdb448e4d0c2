"""Kubernetes Pod Security Standards, "restricted" profile, checked in code on plain API dicts.

Kubernetes 1.20 (our local control plane) has no PodSecurity admission (1.23+), so we check the
rules ourselves: on the Helm chart's pods (tests/charts) and on any pod spec plansmith creates
(build Jobs, serving Deployments). The rules follow the "restricted" profile of
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline rules included):
no host namespaces, ports or paths, not privileged, only the allowed volume types, no privilege
escalation, runAsNonRoot and no UID 0, seccomp RuntimeDefault or Localhost, capabilities drop ALL
and add at most NET_BIND_SERVICE, no unsafe sysctls, default /proc mount, no custom SELinux
user/role/type outside the allowed types, no AppArmor "unconfined".

    problems = restricted_violations(deployment["spec"]["template"]["spec"])
    assert not problems, problems

Pure functions over dicts in the API's camelCase form (what `helm template`, `kubectl get -o json`
or ApiClient.sanitize_for_serialization give). No Python library implements these checks; the
reference implementation is Go (k8s.io/pod-security-admission).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

ALLOWED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
ALLOWED_ADDED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
ALLOWED_SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
APPARMOR_ANNOTATION_PREFIX = "container.apparmor.security.beta.kubernetes.io/"
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")

# kind -> path from the object to its pod spec
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def _containers(pod_spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for field in CONTAINER_LISTS:
        for index, container in enumerate(pod_spec.get(field) or []):
            yield f"{field}[{index}] ({container.get('name', '?')})", container


def restricted_violations(pod_spec: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> list[str]:
    """Every way `pod_spec` breaks the restricted profile, as 'where: what' strings; [] if none.
    `annotations` are the pod (template) metadata annotations, for the AppArmor rule."""
    problems: list[str] = []
    pod_context: Mapping[str, Any] = pod_spec.get("securityContext") or {}

    for host_field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host_field):
            problems.append(f"spec.{host_field}: must not be true")

    for index, volume in enumerate(pod_spec.get("volumes") or []):
        kinds = [key for key in volume if key != "name"]
        for kind in kinds:
            if kind not in ALLOWED_VOLUME_TYPES:
                problems.append(f"spec.volumes[{index}] ({volume.get('name', '?')}): volume type {kind} is not allowed")

    for index, sysctl in enumerate(pod_context.get("sysctls") or []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"spec.securityContext.sysctls[{index}]: {sysctl.get('name')} is not a safe sysctl")

    problems += _selinux_problems("spec.securityContext", pod_context)
    if (pod_context.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("spec.securityContext.windowsOptions.hostProcess: must not be true")
    if pod_context.get("runAsUser") == 0:
        problems.append("spec.securityContext.runAsUser: must not be 0 (root)")
    if (pod_context.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append("spec.securityContext.appArmorProfile: must not be Unconfined")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP_TYPES:
        problems.append(f"spec.securityContext.seccompProfile.type: {pod_seccomp} is not RuntimeDefault or Localhost")

    for key, value in (annotations or {}).items():
        if key.startswith(APPARMOR_ANNOTATION_PREFIX) and value != "runtime/default" and not value.startswith("localhost/"):
            problems.append(f"metadata.annotations[{key}]: AppArmor profile {value!r} is not allowed")

    for where, container in _containers(pod_spec):
        at = f"spec.{where}"
        context: Mapping[str, Any] = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"{at}: privileged must not be true")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: securityContext.allowPrivilegeEscalation must be false")
        run_as_non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if run_as_non_root is not True:
            problems.append(f"{at}: runAsNonRoot must be true (in the pod or container securityContext)")
        if context.get("runAsUser") == 0:
            problems.append(f"{at}: securityContext.runAsUser must not be 0 (root)")
        seccomp = (context.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ALLOWED_SECCOMP_TYPES:
            problems.append(f"{at}: seccompProfile.type must be RuntimeDefault or Localhost (got {seccomp})")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{at}: securityContext.capabilities.drop must include ALL")
        added = set(capabilities.get("add") or []) - ALLOWED_ADDED_CAPABILITIES
        if added:
            problems.append(f"{at}: capabilities {sorted(added)} may not be added (only NET_BIND_SERVICE)")
        if context.get("procMount") not in (None, "Default"):
            problems.append(f"{at}: securityContext.procMount must be Default")
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{at}: windowsOptions.hostProcess must not be true")
        if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{at}: appArmorProfile must not be Unconfined")
        problems += _selinux_problems(f"{at}.securityContext", context)
        for port_index, port in enumerate(container.get("ports") or []):
            if port.get("hostPort"):
                problems.append(f"{at}.ports[{port_index}]: hostPort must not be set")
    return problems


def _selinux_problems(at: str, context: Mapping[str, Any]) -> list[str]:
    options = context.get("seLinuxOptions") or {}
    problems = []
    if options.get("type", "") not in ALLOWED_SELINUX_TYPES:
        problems.append(f"{at}.seLinuxOptions.type: {options['type']} is not allowed")
    for field in ("user", "role"):
        if options.get(field):
            problems.append(f"{at}.seLinuxOptions.{field}: must not be set")
    return problems


def pod_template(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, str]] | None:
    """(pod spec, pod annotations) of a Pod or of a workload's pod template; None for other kinds."""
    path = POD_SPEC_PATHS.get(obj.get("kind", ""))
    if path is None:
        return None
    node: Any = obj
    for step in path[:-1]:
        node = node.get(step) or {}
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return node.get(path[-1]) or {}, annotations
