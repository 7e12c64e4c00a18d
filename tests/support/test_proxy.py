"""The test proxy itself, against a real echo server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.proxy import TcpProxy

TIMEOUT = 5.0


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback echo server; one thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        conn.settimeout(0.05)
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield listener.getsockname()[1]
    stop.set()
    acceptor.join(TIMEOUT)
    for thread in threads:
        thread.join(TIMEOUT)
    listener.close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[TcpProxy]:
    with TcpProxy(upstream=("127.0.0.1", echo_port)) as running:
        yield running


def connect(proxy: TcpProxy, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_passes_bytes_both_ways(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert echo(sock, b"hello") == b"hello"
        assert echo(sock, b"x" * 100_000) == b"x" * 100_000


def test_latency_delays_each_way(proxy: TcpProxy) -> None:
    proxy.set_latency(0.2)
    with connect(proxy) as sock:
        start = time.monotonic()
        assert echo(sock, b"ping") == b"ping"
        # Delayed on the way there and on the way back.
        assert time.monotonic() - start >= 0.4
    with pytest.raises(ValueError):
        proxy.set_latency(-1)


def test_blackhole_holds_traffic_until_restored(proxy: TcpProxy) -> None:
    with connect(proxy, timeout=0.5) as sock:
        assert echo(sock, b"a") == b"a"
        proxy.blackhole()
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):
            sock.recv(16)
        proxy.restore()
        sock.settimeout(TIMEOUT)
        assert sock.recv(16) == b"held"


def test_new_connections_wait_out_a_blackhole(proxy: TcpProxy) -> None:
    proxy.blackhole()
    with connect(proxy, timeout=0.5) as sock:
        sock.sendall(b"early")
        with pytest.raises(TimeoutError):
            sock.recv(16)
        proxy.restore()
        sock.settimeout(TIMEOUT)
        assert sock.recv(16) == b"early"


def test_drop_loses_the_bytes(proxy: TcpProxy) -> None:
    with connect(proxy, timeout=0.5) as sock:
        proxy.drop()
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(16)
        proxy.restore()
        sock.settimeout(TIMEOUT)
        assert echo(sock, b"kept") == b"kept"  # "lost" never arrives


def test_reset_closes_open_connections_with_a_rst(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert echo(sock, b"a") == b"a"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"b")
            sock.recv(16)
    with connect(proxy) as again:  # the proxy still accepts
        assert echo(again, b"c") == b"c"


def test_stop_joins_every_thread(echo_port: int) -> None:
    before = threading.active_count()
    proxy = TcpProxy(upstream=("127.0.0.1", echo_port))
    socks = [connect(proxy) for _ in range(3)]
    for sock in socks:
        assert echo(sock, b"x") == b"x"
    proxy.blackhole()
    proxy.stop()
    proxy.stop()  # idempotent
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + TIMEOUT
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)  # the echo server's own threads see EOF and end
    assert threading.active_count() <= before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


def test_listens_on_loopback_only(echo_port: int) -> None:
    with pytest.raises(ValueError):
        TcpProxy(upstream=("127.0.0.1", echo_port), listen_host="0.0.0.0")
