"""Thin adapter over the Kubernetes API for the few writes and reads the operator makes outside
kopf's watches. Synchronous (the `kubernetes` client); handlers call it through asyncio.to_thread.

The API calls here, together with kopf's watches, are exactly what the Helm chart's ClusterRole grants."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from plansmith.spec import API_GROUP, API_VERSION, PLURAL

log = logging.getLogger(__name__)

FIELD_MANAGER = "plansmith"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply; the client sends the body as JSON, which is YAML


class KubeApi:
    def __init__(self, kubeconfig: str | None = None) -> None:
        """In a pod, the pod's ServiceAccount; elsewhere `kubeconfig`, by default $KUBECONFIG or ~/.kube/config."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig)
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def create_job(self, body: dict[str, Any]) -> bool:
        """Create the Job; False when it already exists (named from the engine key: no duplicates)."""
        try:
            self.batch.create_namespaced_job(body["metadata"]["namespace"], body)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def job_termination(self, namespace: str, job: str) -> dict[str, Any]:
        """The builder's JSON result from the newest pod of the Job (its termination message),
        or what Kubernetes says about how the container ended (OOMKilled, Error, ...)."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
        pods.sort(key=lambda p: p.metadata.creation_timestamp, reverse=True)
        for pod in pods:
            for status in pod.status.container_statuses or []:
                terminated = status.state.terminated if status.state else None
                if terminated is None:
                    continue
                result: dict[str, Any] = {}
                for line in reversed((terminated.message or "").strip().splitlines()):
                    try:
                        result = json.loads(line)
                        break
                    except json.JSONDecodeError:
                        continue
                if terminated.reason == "OOMKilled":
                    result = {**result, "reason": "OOMKilled", "message": "the build ran out of memory"}
                if not result.get("reason") and terminated.exit_code:
                    result = {**result, "reason": terminated.reason or "BuildFailed",
                              "message": (terminated.message or "")[-500:] or f"exit code {terminated.exit_code}"}
                return result
        return {}

    def apply(self, body: dict[str, Any]) -> None:
        """Server-side apply, as field manager "plansmith": the object is created, or becomes what
        `body` says. What an earlier apply set and `body` leaves out (a removed sidecar, volume,
        environment variable, limit or nodeSelector entry) is removed; a strategic merge patch kept
        it, merging lists and maps by key. `force` takes over fields another manager set."""
        kind, namespace, name = body["kind"], body["metadata"]["namespace"], body["metadata"]["name"]
        patch = {"Deployment": self.apps.patch_namespaced_deployment, "Service": self.core.patch_namespaced_service}[kind]
        patch(name, namespace, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH)

    def delete_deployment(self, namespace: str, name: str) -> None:
        try:
            self.apps.delete_namespaced_deployment(name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        secret = self.core.read_namespaced_secret(name, namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status})
        except ApiException as error:
            if error.status != 404:  # deleted meanwhile: nothing to report on
                raise
