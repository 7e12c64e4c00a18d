"""Channels spread over several runsvc replicas.

A target is either one gRPC target string (``host:port``, ``dns:///name:port``,
``ipv4:a:p,b:p``) or a list of ``host:port`` addresses, which becomes an
``ipv4:`` or ``ipv6:`` target. Channels opened here use the ``round_robin``
policy: a connection to every address the target resolves to, each call on
the next ready one. A replica that goes away drops out of the rotation as
soon as its connection breaks, so the retries of the calls that are safe to
repeat (``RetryPolicy``) land on the others.

gRPC itself replays a call that never left the client (its "transparent
retry", on by default and asked for here explicitly): a call that was only
queued on a connection that broke goes to another replica even when the
client would not repeat it, such as ``force_cancel``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

import grpc

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

Target = str | Sequence[str]
"""One gRPC target string, or a list of ``host:port`` addresses of the replicas."""


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def target_of(addresses: Target) -> str:
    """The gRPC target string for ``addresses``.

    A list of IP addresses becomes ``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,…``); a
    name that resolves to several replicas is one string, ``dns:///name:port``.
    """
    if isinstance(addresses, str):
        if not addresses:
            raise ValueError("the target is empty")
        return addresses
    if not addresses:
        raise ValueError("no address given")
    families = set()
    for address in addresses:
        host, _ = _split(address)
        try:
            ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(
                f"{address!r}: a list takes IP addresses; for a name that resolves to "
                "several replicas, pass one target such as 'dns:///runsvc:50051'"
            ) from None
        if ip.version == 6 and not host.startswith("["):
            raise ValueError(f"{address!r}: write an IPv6 address in brackets, [::1]:50051")
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError("one list cannot mix IPv4 and IPv6 addresses (gRPC resolves each apart)")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:{','.join(addresses)}"


MAX_RECONNECT_BACKOFF_MS = 5000
"""A replica that comes back gets calls again within about this long (gRPC's default: 2 min)."""


def channel_options() -> list[tuple[str, str | int]]:
    """The options of a balanced channel: round_robin, transparent retries, reconnect backoff."""
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def balanced_channel(
    addresses: Target, *, credentials: grpc.ChannelCredentials | None = None
) -> grpc.Channel:
    """A channel calling every replica in ``addresses`` in turn (TLS with ``credentials``)."""
    target = target_of(addresses)
    if credentials is None:
        return grpc.insecure_channel(target, options=channel_options())
    return grpc.secure_channel(target, credentials, options=channel_options())
