"""A TCP proxy on loopback for fault-injection tests, controlled from the test.

    with TcpProxy(upstream=("127.0.0.1", port)) as proxy:
        channel = grpc.insecure_channel(proxy.address)
        proxy.set_latency(0.2)      # every chunk arrives 200 ms later, in order
        proxy.blackhole()           # nothing passes either way, no RST: a partition
        proxy.restore()             # what was held now flows, as after a short partition
        proxy.drop()                # bytes are read and thrown away: the stream is lost
        proxy.reset()               # every open connection is closed with a RST

Modes apply to open connections and to new ones. In ``blackhole`` the proxy
stops reading, so data waits in the kernel's buffers exactly as TCP keeps
retransmitting during a real partition, and new connections are accepted but
not connected upstream until ``restore``. ``stop`` (or leaving the ``with``)
closes everything and joins every thread.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
import time
from collections import deque
from types import TracebackType

_POLL = 0.02
_CHUNK = 65536
_JOIN_TIMEOUT = 5.0


class Mode(enum.Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    DROP = "drop"


def _abort(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0) rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pipe:
    """One direction of one connection: a reader thread and a delayed writer thread."""

    def __init__(
        self, proxy: TcpProxy, source: socket.socket, sink: socket.socket, client: socket.socket
    ) -> None:
        self._proxy = proxy
        self._proxy_client = client
        self._source = source
        self._sink = sink
        self._queue: deque[tuple[float, bytes]] = deque()
        self._ready = threading.Condition()
        self._eof = False
        self.closed = threading.Event()
        self.threads = [
            threading.Thread(target=self._read, daemon=True, name="proxy-read"),
            threading.Thread(target=self._write, daemon=True, name="proxy-write"),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        try:
            while not self.closed.is_set():
                mode = self._proxy.mode
                if mode is Mode.BLACKHOLE:
                    self._proxy.changed_wait(_POLL)
                    continue
                try:
                    data = self._source.recv(_CHUNK)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                if self._proxy.mode is Mode.DROP:
                    continue
                if self._source is self._proxy_client:
                    self._proxy.count_sent()
                with self._ready:
                    self._queue.append((time.monotonic() + self._proxy.latency, data))
                    self._ready.notify()
        finally:
            with self._ready:
                self._eof = True
                self._ready.notify()

    def _write(self) -> None:
        try:
            while not self.closed.is_set():
                with self._ready:
                    while not self._queue and not self._eof and not self.closed.is_set():
                        self._ready.wait(_POLL)
                    if not self._queue:
                        if self._eof:
                            break
                        continue
                    due, data = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0 or self._proxy.mode is Mode.BLACKHOLE:
                    self._proxy.changed_wait(min(max(wait, 0), _POLL) or _POLL)
                    continue
                with self._ready:
                    self._queue.popleft()
                try:
                    self._sink.sendall(data)
                except OSError:
                    break
        finally:
            # The other side sees this direction end (FIN), as a real peer would.
            with contextlib.suppress(OSError):
                self._sink.shutdown(socket.SHUT_WR)
            self.closed.set()


class _Connection:
    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.pipes: list[_Pipe] = []
        self.aborted = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="proxy-conn")

    def _run(self) -> None:
        while self.proxy.mode is Mode.BLACKHOLE and not self.aborted.is_set():
            self.proxy.changed_wait(_POLL)
        if self.aborted.is_set():
            _abort(self.client)
            return
        try:
            upstream = socket.create_connection(self.proxy.upstream, timeout=5)
        except OSError:
            _abort(self.client)
            return
        self.upstream = upstream
        for sock in (self.client, upstream):
            sock.settimeout(_POLL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pipes = [
            _Pipe(self.proxy, self.client, upstream, self.client),
            _Pipe(self.proxy, upstream, self.client, self.client),
        ]
        for pipe in self.pipes:
            pipe.start()
        while not self.aborted.is_set() and not all(p.closed.is_set() for p in self.pipes):
            self.aborted.wait(_POLL)
        self.close(abort=False)

    def close(self, *, abort: bool) -> None:
        if abort:
            self.aborted.set()
        for pipe in self.pipes:
            pipe.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if abort:
                _abort(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        for pipe in self.pipes:
            for thread in pipe.threads:
                thread.join(timeout)


class TcpProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream``."""

    def __init__(self, *, upstream: tuple[str, int], listen_host: str = "127.0.0.1") -> None:
        if listen_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the proxy listens on loopback only")
        self.upstream = upstream
        self.mode = Mode.PASS
        self.latency = 0.0
        self.stopped = False
        # Chunks the clients sent upstream: with a request-reply protocol (libpq), its
        # round trips.
        self.sent = 0
        self._changed = threading.Condition()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server((listen_host, 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="proxy-accept")
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count_sent(self) -> None:
        with self._lock:
            self.sent += 1

    # --- control -------------------------------------------------------------------

    def _set_mode(self, mode: Mode) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    def changed_wait(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` (both ways; order kept)."""
        if seconds < 0:
            raise ValueError("latency cannot be negative")
        self.latency = seconds

    def blackhole(self) -> None:
        """Nothing passes either way and nobody is told: a network partition."""
        self._set_mode(Mode.BLACKHOLE)

    def drop(self) -> None:
        """Read and discard everything: the bytes are lost for good."""
        self._set_mode(Mode.DROP)

    def restore(self) -> None:
        """Forward again; in a blackhole's case what was held is delivered now."""
        self._set_mode(Mode.PASS)

    def reset(self) -> int:
        """Close every open connection with a RST; new ones are still accepted."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close(abort=True)
        for connection in connections:
            connection.join(_JOIN_TIMEOUT)
        return len(connections)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections if c.thread.is_alive())

    # --- life ----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection = _Connection(self, client)
            with self._lock:
                self._connections = [c for c in self._connections if c.thread.is_alive()]
                self._connections.append(connection)
            connection.thread.start()

    def stop(self) -> None:
        """Close the listener and every connection; join every thread."""
        if self.stopped:
            return
        self.stopped = True
        with self._changed:
            self._changed.notify_all()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(_JOIN_TIMEOUT)
        self.reset()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
