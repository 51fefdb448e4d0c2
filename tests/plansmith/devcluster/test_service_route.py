"""wait_until_routed against a real HTTP server: refused, then not ready, then ready."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from plansmith.devcluster.processes import free_port
from plansmith.devcluster.service_route import NotRouted, wait_until_routed


def test_waits_through_refused_connections_and_not_ready_answers():
    port = free_port()
    asked: list[str] = []

    class Model(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            asked.append(self.path)
            self.send_response(200 if len(asked) >= 3 else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    servers: list[http.server.ThreadingHTTPServer] = []

    def listen_after_a_while():  # until then nothing listens: connections are refused
        time.sleep(0.3)
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), Model))
        servers[0].serve_forever(poll_interval=0.05)

    threading.Thread(target=listen_after_a_while, daemon=True).start()
    try:
        waited = wait_until_routed("127.0.0.1", "cnn", port=port, timeout=20, interval=0.05)
    finally:
        servers[0].shutdown()
    assert waited >= 0.3
    assert asked == ["/v2/models/cnn/ready"] * 3  # two 503s, then 200


def test_names_the_url_and_the_last_error_when_never_routed():
    port = free_port()
    with pytest.raises(NotRouted, match=rf"http://127.0.0.1:{port}/v2/models/cnn/ready did not answer 200 within 1 s; "
                                         r"last: .*(refused|Errno)"):
        wait_until_routed("127.0.0.1", "cnn", port=port, timeout=1, interval=0.1)
