"""The ``/metrics`` endpoint: a small HTTP server on its own thread."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class Exporter:
    """Serves ``registry`` at ``http://ADDRESS/metrics`` until :meth:`stop`."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._registry = registry
        self._host = host.strip("[]")
        self._port = int(port)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._httpd, self._thread = start_http_server(
                self._port, addr=self._host, registry=self._registry
            )
        except OSError as error:
            raise RuntimeError(
                f"cannot serve metrics on {self._host}:{self._port} ({error}); "
                "set RUNSVC_METRICS_ADDRESS to another address, or to off"
            ) from error

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the exporter is not started")
        return int(self._httpd.server_address[1])

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None
