"""Wait until a served model answers through its Service's cluster IP.

A model is Ready once its Service's EndpointSlices list its serving pods, but kube-proxy programs
the node's rules from those slices a moment later (its sync period, longer on a busy machine), and
no API shows when it has. Until then a connection to the cluster IP is refused (kube-proxy rejects
traffic to a Service it knows no endpoint of). A client that wants its first request to succeed asks
the KServe v2 readiness endpoint first, as this does.
"""

from __future__ import annotations

import time
import urllib.request


class NotRouted(TimeoutError):
    """The Service did not route to a ready model in time."""


def wait_until_routed(host: str, model: str, *, port: int = 8000, timeout: float = 60.0,
                      interval: float = 0.5) -> float:
    """Seconds until `GET /v2/models/{model}/ready` on host:port answered 200 (KServe v2's "model
    ready"); NotRouted after `timeout`."""
    url = f"http://{host}:{port}/v2/models/{model}/ready"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a cluster IP, never through HTTP_PROXY
    started = time.monotonic()
    last = "no answer yet"
    while (left := timeout - (time.monotonic() - started)) > 0:
        try:
            with direct.open(url, timeout=min(5.0, left)):  # raises HTTPError unless the answer is 2xx
                return time.monotonic() - started
        except OSError as error:  # refused, unreachable, timed out, or an HTTP error: the model is not ready in it
            last = str(error)
        time.sleep(interval)
    raise NotRouted(f"{url} did not answer 200 within {timeout:.0f} s; last: {last}")
