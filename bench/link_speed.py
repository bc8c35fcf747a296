"""What the testbed link carries from host a to host b: one TCP stream, plain and with
mutual TLS 1.3 (the agents' own certificates and contexts), between the hosts' netns.

`bench/migrate.py` measures it in the same run as the migrations, before and after them,
for issue 17's bound: a stop-and-copy's total within 1.5 times memory / TLS link speed.
The ends are blocking sockets in two processes (the receiver in b's netns, the sender in
a's), so the figure is the link's and the cipher's, not an event loop's. Both ends share
this machine's CPUs, like the migrations they are compared with.

    .venv/bin/python bench/link_speed.py [--mib 1024] [--runs 3]   (a testbed of its own)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from godwit.lab.testbed import Testbed
from godwit.tls import TLSFiles, client_context, server_context

PLAIN, TLS = "plain", "TLS"
PORT = 7462
CHUNK = 1 << 20
MiB = 1 << 20
TIMEOUT_S = 120


class LinkError(RuntimeError):
    """A stream across the link failed: no figure."""


class Stream:
    """A TLS session over a blocking socket through memory BIOs, so that the socket is
    read and written in large pieces: Python's `SSLSocket` sends each 16 KiB record with a
    `send()` of its own and reads each with two `recv()` calls (header and body): 505
    against 613 MiB/s across the testbed's veth in one session (CRIU's page path batches
    its records for the same reason: patches 0018 and 0021)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.step(self.tls.do_handshake)

    def step(self, operation: Any, *args: Any) -> Any:
        """Run one TLS operation, feeding it from the socket until it has what it needs."""
        while True:
            try:
                result = operation(*args)
                self.flush()
                return result
            except ssl.SSLWantReadError:
                self.flush()
                self.receive_more("peer closed during TLS")

    def receive_more(self, closed: str) -> None:
        """Hand TLS what the socket has; `closed` is the error if the peer closed it."""
        if not (data := self.sock.recv(CHUNK)):
            raise ConnectionError(closed)
        self.incoming.write(data)

    def flush(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def write(self, data: memoryview) -> None:
        self.tls.write(data)
        self.flush()

    def read_all(self) -> int:
        """Read until the peer's close_notify; the bytes read."""
        total = 0
        while True:
            try:
                if not (data := self.tls.read(CHUNK)):
                    return total
                total += len(data)
            except ssl.SSLWantReadError:
                self.receive_more("peer closed without close_notify")

    def close(self) -> None:
        """Send close_notify and wait for the peer's."""
        self.step(self.tls.unwrap)


def receive(address: str, tls: TLSFiles | None) -> None:
    """Accept one stream, read it to its end, answer the sender's close; print bytes."""
    with socket.create_server((address, PORT)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
    with conn:
        if tls:
            stream = Stream(conn, server_context(tls), server_side=True)
            total = stream.read_all()
            stream.close()
        else:
            view, total = memoryview(bytearray(CHUNK)), 0
            while n := conn.recv_into(view):
                total += n
    print(json.dumps({"bytes": total}), flush=True)


def send(address: str, mib: int, tls: TLSFiles | None) -> None:
    """Send `mib` MiB of random bytes; print the seconds until the receiver had them all
    (its close_notify, or its close of a plain stream)."""
    data = memoryview(os.urandom(CHUNK))
    started = time.perf_counter()
    with socket.create_connection((address, PORT)) as sock:
        stream = Stream(sock, client_context(tls), False, address) if tls else None
        for _ in range(mib):
            if stream:
                stream.write(data)
            else:
                sock.sendall(data)
        cipher = stream.tls.cipher()[0] if stream else "-"
        if stream:
            stream.close()
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    print(json.dumps({"seconds": time.perf_counter() - started, "cipher": cipher}), flush=True)


def identity_args(bed: Testbed, host: str, mode: str) -> list[str]:
    if mode != TLS:
        return []
    files = bed.ca.bundle_for(host)
    return ["--tls", str(files.ca), str(files.cert), str(files.key), str(files.crl)]


def one_stream(bed: Testbed, mode: str, mib: int) -> dict[str, Any]:
    """One stream of `mib` MiB from a to b; its MiB/s and cipher."""
    address = bed.host("b").address
    me = [sys.executable, __file__]
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "text": True}
    started: list[subprocess.Popen] = []
    try:
        receiver = bed.net.run_in("b", [*me, "--receive", address,
                                        *identity_args(bed, "b", mode)], **pipes)
        started.append(receiver)
        if receiver.stdout.readline().strip() != "listening":
            raise LinkError("link_speed: the receiver on b did not start")
        sender = bed.net.run_in("a", [*me, "--send", address, "--mib", str(mib),
                                      *identity_args(bed, "a", mode)], **pipes)
        started.append(sender)
        sent, _ = sender.communicate(timeout=TIMEOUT_S)
        received, _ = receiver.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LinkError(f"link_speed: the {mode} stream took over {TIMEOUT_S} s") from None
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if sender.returncode or receiver.returncode:
        raise LinkError(f"link_speed: the {mode} stream failed")
    if json.loads(received)["bytes"] != mib * MiB:
        raise LinkError(f"link_speed: the {mode} stream lost bytes")
    result = json.loads(sent)
    return {"mib_per_s": round(mib / result["seconds"], 1), "cipher": result["cipher"]}


def measure(bed: Testbed, mib: int = 1024, runs: int = 3) -> dict[str, Any]:
    """`runs` streams of each mode, alternating; MiB/s of each and their medians."""
    streams: dict[str, list[dict[str, Any]]] = {PLAIN: [], TLS: []}
    for _ in range(runs):
        for mode, values in streams.items():
            values.append(one_stream(bed, mode, mib))
    return summary(mib, streams[TLS][0]["cipher"],
                   {mode: [v["mib_per_s"] for v in values] for mode, values in streams.items()})


def combine(*measurements: dict[str, Any]) -> dict[str, Any]:
    """Measurements of one run (before and after the migrations) as one: all streams, and
    the medians over all of them."""
    first = measurements[0]
    return summary(first["mib"], first["cipher"],
                   {mode: [v for m in measurements for v in m["mib_per_s"][mode]]
                    for mode in first["mib_per_s"]})


def summary(mib: int, cipher: str, rates: dict[str, list[float]]) -> dict[str, Any]:
    """A measurement: the MiB/s of every stream per mode, and their medians."""
    return {"mib": mib, "cipher": cipher, "mib_per_s": rates,
            "median_mib_per_s": {mode: statistics.median(v) for mode, v in rates.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--receive", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--send", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--tls", nargs=4, metavar=("CA", "CERT", "KEY", "CRL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    tls = TLSFiles(*map(Path, args.tls)) if args.tls else None
    if args.receive:
        receive(args.receive, tls)
    elif args.send:
        send(args.send, args.mib, tls)
    else:
        from godwit.lab.netns import pick_free_subnet
        try:
            with Testbed(["a", "b"], prefix="gwlink", subnet=pick_free_subnet()) as bed:
                print(json.dumps(measure(bed, args.mib, args.runs), indent=1))
        except LinkError as exc:
            print(exc, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
