"""A client of the netserver workload, for the network tests: one TCP connection (or UDP
socket) from a client host, a numbered request every 10 ms, timestamped replies."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import wait_for

from godwit import network
from godwit.lab.netns import TestHost

PORT = 7000
INTERVAL_S = 0.01


def tcp_counters(host: TestHost) -> dict[str, int]:
    """The host netns' TCP MIB (EstabResets counts RSTs that killed a connection)."""
    text = network.in_netns(host.netns, lambda: Path("/proc/thread-self/net/snmp").read_text())
    head, values = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    return {k: int(v) for k, v in zip(head, values, strict=True)}


class Client:
    """One connection (TCP) or socket (UDP) from the client host; a numbered request every
    10 ms; replies ``N C`` are timestamped."""

    def __init__(self, host: TestHost, address: str, kind: int) -> None:
        self.kind = kind
        self.sock = self._connect(host, address)
        self.replies: list[tuple[float, int, int]] = []
        self.sent: dict[int, float] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._recv)]
        for t in self.threads:
            t.start()

    def _connect(self, host: TestHost, address: str) -> socket.socket:
        def connect() -> socket.socket:
            if self.kind == socket.SOCK_STREAM:
                sock = socket.create_connection((address, PORT), timeout=2)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.connect((address, PORT))
            sock.settimeout(0.5)
            return sock

        return wait_for(lambda: _try(lambda: network.in_netns(host.netns, connect)),
                        timeout=10, what="the server to accept connections")

    def _send(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            self.sent[n] = time.monotonic()
            try:
                self._send_one(f"{n}\n".encode())
            except OSError as exc:
                if self.kind == socket.SOCK_STREAM:
                    self.errors.append(f"send: {exc!r}")
                    return
            time.sleep(INTERVAL_S)

    def _send_one(self, data: bytes) -> None:
        """Send all of it; a full send buffer (a long freeze) blocks, as for any client."""
        while data and not self.stop.is_set():
            try:
                data = data[self.sock.send(data):]
            except TimeoutError:
                continue

    def _recv(self) -> None:
        buf = b""
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                if self.kind == socket.SOCK_DGRAM:
                    continue  # ICMP port unreachable: the server was not bound yet
                self.errors.append("recv: connection refused")
                return
            except OSError as exc:
                self.errors.append(f"recv: {exc!r}")
                return
            if not data:
                self.errors.append("connection closed by the server")
                return
            buf += data if self.kind == socket.SOCK_STREAM else data.rstrip(b"\n") + b"\n"
            *lines, buf = buf.split(b"\n")
            now = time.monotonic()
            self.replies += [(now, *map(int, line.split())) for line in lines]

    def wait_replies(self, count: int) -> None:
        target = len(self.replies) + count
        wait_for(lambda: len(self.replies) >= target, what=f"{count} more replies")

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self.sock.close()

    def assert_stream_intact(self) -> None:
        """TCP: no socket error, every request answered once and in order, and the server
        counted each exactly once (a lost or repeated request shows in both)."""
        assert self.errors == []
        numbers = [n for _, n, _ in self.replies]
        assert numbers == list(range(1, len(numbers) + 1)), "a request was lost or duplicated"
        assert all(n == count for _, n, count in self.replies), "the server lost or repeated one"

    def max_stall(self) -> float:
        times = [t for t, _, _ in self.replies]
        return max(b - a for a, b in itertools.pairwise(times))


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OSError:
        return None
