"""runsvc-web: the monolith UI's outbound-call REST endpoints, served by waitress.

Each request's ``Authorization: Bearer <token>`` is the gRPC caller (none: 401);
see :mod:`runsvc_client.flask_blueprint` for the endpoints. Configured from
the environment:

* ``RUNSVC_WEB_ADDRESS`` (``127.0.0.1:8080``): where to listen, ``host:port``;
* ``RUNSVC_GRPC_ADDRESS`` (``127.0.0.1:50051``): the runsvc target, or several
  addresses separated by commas;
* ``RUNSVC_WEB_ALLOWED_ORIGINS``: origins besides this host that may POST,
  separated by commas (``https://app.example.com``);
* ``RUNSVC_WEB_THREADS`` (``8``): requests served at once;
* ``RUNSVC_WEB_GRPC_CA_FILE``: call runsvc over TLS, trusting this CA (PEM);
  ``RUNSVC_WEB_GRPC_CERT_FILE`` and ``RUNSVC_WEB_GRPC_KEY_FILE`` add a client
  certificate for a runsvc that requires mutual TLS.

SIGTERM or SIGINT stops it: the listener closes and requests in flight finish.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

import flask
import grpc
import waitress

from runsvc_client.balancing import Target, balanced_channel
from runsvc_client.flask_blueprint import bearer_blueprint

DEFAULT_ADDRESS = "127.0.0.1:8080"
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_THREADS = 8

log = logging.getLogger("runsvc_client.web")


def create_app(
    target: Target | grpc.Channel, *, allowed_origins: Sequence[str] = ()
) -> flask.Flask:
    app = flask.Flask("runsvc_web")
    app.register_blueprint(bearer_blueprint(target, allowed_origins=allowed_origins))
    return app


def _credentials(env: Mapping[str, str]) -> grpc.ChannelCredentials | None:
    """TLS to runsvc when a CA file is named (with a client certificate for mutual TLS)."""
    ca, cert, key = (
        env.get(f"RUNSVC_WEB_GRPC_{name}_FILE") or None for name in ("CA", "CERT", "KEY")
    )
    if ca is None:
        if cert or key:
            raise ValueError("RUNSVC_WEB_GRPC_CERT_FILE and _KEY_FILE need RUNSVC_WEB_GRPC_CA_FILE")
        return None
    if (cert is None) != (key is None):
        raise ValueError("RUNSVC_WEB_GRPC_CERT_FILE and RUNSVC_WEB_GRPC_KEY_FILE go together")
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes() if key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )
    except OSError as error:
        raise ValueError(f"cannot read {error.filename}: {error.strerror}") from error


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


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = os.environ
    try:
        host, port = _listen_address(env.get("RUNSVC_WEB_ADDRESS") or DEFAULT_ADDRESS)
        threads_text = env.get("RUNSVC_WEB_THREADS") or str(DEFAULT_THREADS)
        if not threads_text.isdigit() or int(threads_text) < 1:
            raise ValueError(
                f"RUNSVC_WEB_THREADS must be a whole number >= 1, not {threads_text!r}"
            )
        threads = int(threads_text)
        targets = _split(env.get("RUNSVC_GRPC_ADDRESS") or DEFAULT_GRPC_ADDRESS)
        channel = balanced_channel(
            targets[0] if len(targets) == 1 else targets, credentials=_credentials(env)
        )
    except ValueError as error:
        print(f"runsvc-web: {error}", file=sys.stderr)
        return 2
    app = create_app(channel, allowed_origins=_split(env.get("RUNSVC_WEB_ALLOWED_ORIGINS", "")))
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
