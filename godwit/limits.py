"""Limits of the agent's listener, so idle or slow peers cannot starve it of descriptors.

Every accepted connection is counted from the moment it is accepted, before TLS:
- at most `pending_cap` connections may still be in their TLS handshake; a new one pushes
  the oldest out (so a flood of sockets that never say hello cannot keep an authenticated
  peer out), and a handshake not done in `handshake_timeout` is cut;
- at most `total_cap` connections in all; beyond it a new connection is closed at once;
- after the handshake, a request head must arrive within `header_timeout`, and a body that
  has started must keep flowing (no `body_timeout` without a byte).
Both caps follow the process's descriptor limit (`ulimit -n`), read at each accept, and
leave half of it to CRIU, runc, images and clients of other agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import time
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)

Peer = tuple  # the remote (address, port, ...): unique among one listener's live sockets
SWEEP_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_pending: int = 512


def descriptor_caps(max_pending: int) -> tuple[int, int]:
    """(pending_cap, total_cap) from the soft RLIMIT_NOFILE: half of it for connections,
    a quarter at most for those still in their handshake."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    total = max(32, soft // 2)
    return max(8, min(max_pending, soft // 4)), total


@dataclass
class Connection:
    sock: socket.socket
    accepted: float
    authenticated: bool = False
    cut: bool = False                    # shut down, its transport not closed yet
    head_since: float | None = None      # waiting for a request head since then
    in_flight: int = 0
    last_byte: float = field(default_factory=time.monotonic)
    bodies: list = field(default_factory=list)  # StreamReaders of requests in flight


class ConnectionGate:
    """Counts and polices the connections of one listener (see the module docstring)."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.connections: dict[Peer, Connection] = {}
        self.evicted = 0
        self.refused = 0

    def pending(self) -> list[Peer]:
        return [peer for peer, c in self.connections.items()
                if not c.authenticated and not c.cut]

    def admit(self, peer: Peer, sock: socket.socket) -> bool:
        """Count a freshly accepted socket; False (and the caller closes it) when full."""
        pending_cap, total_cap = descriptor_caps(self.limits.max_pending)
        if len(self.connections) >= total_cap:
            self.refused += 1
            return False
        waiting = self.pending()
        while len(waiting) >= pending_cap:
            self.cut(waiting.pop(0))
            self.evicted += 1
        self.connections[peer] = Connection(sock, time.monotonic())
        return True

    def cut(self, peer: Peer) -> None:
        """End a connection from under its transport: its reads see EOF, it closes itself
        (shutdown, not close: the descriptor stays asyncio's until then)."""
        conn = self.connections.get(peer)
        if conn:
            conn.cut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def closed(self, peer: Peer) -> None:
        self.connections.pop(peer, None)

    def authenticated(self, peer: Peer) -> None:
        if conn := self.connections.get(peer):
            conn.authenticated = True
            conn.head_since = time.monotonic()

    def received(self, peer: Peer) -> None:
        if conn := self.connections.get(peer):
            conn.last_byte = time.monotonic()
            if conn.in_flight == 0 and conn.head_since is None:
                conn.head_since = conn.last_byte

    def overdue(self, now: float) -> list[tuple[Peer, str]]:
        """Connections past a limit, with the limit's name."""
        found = []
        for peer, c in self.connections.items():
            if c.cut:
                continue
            if not c.authenticated:
                if now - c.accepted > self.limits.handshake_timeout:
                    found.append((peer, "TLS handshake"))
            elif c.head_since is not None and now - c.head_since > self.limits.header_timeout:
                found.append((peer, "request head"))
            elif any(not body.is_eof() for body in c.bodies) \
                    and now - c.last_byte > self.limits.body_timeout:
                found.append((peer, "request body"))
        return found

    async def sweep(self) -> None:
        """Cut overdue connections, once a second, until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for peer, what in self.overdue(time.monotonic()):
                log.info("closing %s: no %s in time", peer[0], what)
                self.cut(peer)

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Mark a request in flight on its connection (no head timeout while it runs)."""
        conn = self.connections.get(_peer_of(request.transport))
        if conn is None:
            return await handler(request)
        conn.in_flight += 1
        conn.head_since = None
        conn.bodies.append(request.content)
        try:
            return await handler(request)
        finally:
            conn.in_flight -= 1
            conn.bodies.remove(request.content)


def _peer_of(transport: asyncio.BaseTransport | None) -> Peer | None:
    peer = transport.get_extra_info("peername") if transport else None
    return tuple(peer) if peer else None


class _GatedSocket(socket.socket):
    """An accepted socket that tells the gate when asyncio closes it."""

    gate: ConnectionGate
    peer: Peer

    def close(self) -> None:
        self.gate.closed(self.peer)
        super().close()


class GatedListener(socket.socket):
    """A listening socket whose accept() counts connections at the gate."""

    gate: ConnectionGate

    def accept(self) -> tuple[socket.socket, Peer]:
        while True:  # when empty, _accept() raises BlockingIOError: asyncio waits again
            fd, address = self._accept()
            conn = _GatedSocket(self.family, self.type, self.proto, fileno=fd)
            conn.gate, conn.peer = self.gate, tuple(address)
            if self.gate.admit(conn.peer, conn):
                return conn, address
            conn.close()


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen by the gate (its transport is TLS)."""

    def __init__(self, gate: ConnectionGate, inner: asyncio.Protocol) -> None:
        self.gate, self.inner, self.peer = gate, inner, None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = _peer_of(transport)
        self.gate.authenticated(self.peer)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.gate.received(self.peer)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def listen(host: str, port: int, gate: ConnectionGate, backlog: int = 128) -> GatedListener:
    """A bound, listening socket for ``host:port`` whose connections the gate counts."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = GatedListener(family, kind, proto)
    sock.gate = gate
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class GatedSite(web.SockSite):
    """aiohttp's site on a GatedListener, with the gate's handshake timeout and sweep."""

    def __init__(self, runner: web.BaseRunner, sock: GatedListener, **kwargs) -> None:
        super().__init__(runner, sock, **kwargs)
        self.gate = sock.gate
        self.sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        self._server = await loop.create_server(
            lambda: _Tracked(self.gate, server()), sock=self._sock, ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self.gate.limits.handshake_timeout if self._ssl_context
            else None)
        self.sweeper = asyncio.create_task(self.gate.sweep())

    async def stop(self) -> None:
        if self.sweeper:
            self.sweeper.cancel()
        await super().stop()
