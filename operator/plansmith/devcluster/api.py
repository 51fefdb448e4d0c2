"""A few Kubernetes REST calls over urllib for bringing the dev cluster up and down.

The `kubernetes` client is an optional extra (plansmith[operator]); `plansmith dev-cluster` needs
only these calls (read a node, patch its status and labels, create a namespace or a Secret)."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Api:
    server: str
    ca_cert: Path
    token: str

    def request(self, method: str, path: str, body: object = None, content_type: str = "application/json",
                timeout: float = 10) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type, "Accept": "application/json"})
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        try:
            with urllib.request.urlopen(request, context=context, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode(errors="replace")[:500]) from None

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def create(self, path: str, body: dict) -> None:
        """POST, treating "already exists" as done."""
        try:
            self.request("POST", path, body)
        except ApiError as error:
            if error.status != 409:
                raise

    def apply_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "type": "Opaque", "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
        self.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        try:
            self.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body)
        except ApiError as error:
            if error.status != 409:
                raise
            self.request("PUT", f"/api/v1/namespaces/{namespace}/secrets/{name}", body)

    def node_ready(self, name: str) -> bool:
        try:
            node = self.get(f"/api/v1/nodes/{name}")
        except (ApiError, OSError):
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))
