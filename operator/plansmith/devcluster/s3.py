"""An S3 HTTP endpoint from moto's server, for tests and the local cluster."""

from __future__ import annotations

import shutil
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from plansmith.devcluster.processes import Daemon, free_port

ACCESS_KEY = "plansmith-dev"
SECRET_KEY = "plansmith-dev-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    daemon: Daemon | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def credentials_env(self) -> dict[str, str]:
        """The environment a client (boto3, the builder) needs to reach this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def start(self) -> "S3Server":
        executable = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        self.daemon = Daemon("moto_server", [executable, "-H", self.host, "-p", str(self.port)],
                             Path(self.workdir) / "logs" / "moto.log").start()
        self.daemon.wait_until(lambda: urllib.request.urlopen(self.endpoint + "/", timeout=2).status == 200,
                               60, "the S3 endpoint")
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()
