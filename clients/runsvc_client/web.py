"""runsvc-web: the monolith UI's outbound-call REST endpoints, served by waitress.

Each request's ``Authorization: Bearer <token>`` is the gRPC caller (none: 401);
see :mod:`runsvc_client.flask_blueprint` for the endpoints. Configured from
the environment:

* ``RUNSVC_WEB_ADDRESS`` (``127.0.0.1:8080``): where to listen, ``host:port``;
* ``RUNSVC_GRPC_ADDRESS`` (``127.0.0.1:50051``): the runsvc target, or several
  addresses separated by commas;
* ``RUNSVC_WEB_ALLOWED_ORIGINS``: origins besides this host that may POST,
  separated by commas (``https://app.example.com``);
* ``RUNSVC_WEB_THREADS`` (``8``): requests served at once.

SIGTERM or SIGINT stops it: the listener closes and requests in flight finish.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import flask
import waitress

from runsvc_client.balancing import Target
from runsvc_client.flask_blueprint import bearer_blueprint

DEFAULT_ADDRESS = "127.0.0.1:8080"
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_THREADS = 8

log = logging.getLogger("runsvc_client.web")


def create_app(target: Target, *, allowed_origins: Sequence[str] = ()) -> flask.Flask:
    app = flask.Flask("runsvc_web")
    app.register_blueprint(bearer_blueprint(target, allowed_origins=allowed_origins))
    return app


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"RUNSVC_WEB_ADDRESS must be host:port, not {value!r}")
    return host.strip("[]"), int(port)


def _stop(signum: int, frame: FrameType | None) -> None:
    # waitress's loop ends on SystemExit and lets its threads finish their requests.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = os.environ
    try:
        host, port = _listen_address(env.get("RUNSVC_WEB_ADDRESS") or DEFAULT_ADDRESS)
        threads = int(env.get("RUNSVC_WEB_THREADS") or DEFAULT_THREADS)
        if threads < 1:
            raise ValueError("RUNSVC_WEB_THREADS must be at least 1")
    except ValueError as error:
        print(f"runsvc-web: {error}", file=sys.stderr)
        return 2
    targets = _split(env.get("RUNSVC_GRPC_ADDRESS") or DEFAULT_GRPC_ADDRESS)
    target: Target = targets[0] if len(targets) == 1 else targets
    app = create_app(target, allowed_origins=_split(env.get("RUNSVC_WEB_ALLOWED_ORIGINS", "")))
    server = waitress.create_server(app, host=host, port=port, threads=threads)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info(
        "serving on http://%s:%s, runsvc at %s",
        host,
        server.effective_port,
        ",".join(targets),
    )
    server.run()
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
