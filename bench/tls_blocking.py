"""Throughput of a data path outside asyncio: a blocking socket in a thread, plain vs mutual
TLS 1.3, over loopback (issue 17: is TLS at the cipher's speed without the event loop?).

The receiver is its own process (its own GIL, like another host); the sender writes from a
thread with large `sendall` calls, which release the GIL during the copy and the cipher.
Same throw-away godwit CA and TLS contexts as the agents. Runs alternate plain/TLS.

    .venv/bin/python bench/tls_blocking.py [--mib 1024] [--runs 3] [--chunk-kib 1024]

Compare with `bench/tls_throughput.py` (aiohttp, the agents' data path) in the same session.
Writes bench/results/tls_blocking.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tls_throughput import PLAIN, TLS, make_loopback_ca, tls_over_plain

from godwit.tls import TLSFiles, client_context, server_context

RESULTS = Path(__file__).parent / "results" / "tls_blocking.json"
MiB = 1 << 20


def _receive(listener: socket.socket, ctx: ssl.SSLContext | None, buf: int) -> dict[str, Any]:
    """Accept one connection and read it to its end; bytes and CPU seconds."""
    conn, _ = listener.accept()
    cpu = time.process_time()
    sock = ctx.wrap_socket(conn, server_side=True) if ctx else conn
    view, total = memoryview(bytearray(buf)), 0
    with sock:
        while n := sock.recv_into(view):
            total += n
        if ctx:
            sock.unwrap()  # answer the sender's close_notify
    return {"bytes": total, "cpu": time.process_time() - cpu}


def _receiver_process(tls: TLSFiles, buf: int, conn: Connection) -> None:
    """Serve one connection per request on the plain or the TLS port, until told to stop."""
    listeners = {}
    for mode in (PLAIN, TLS):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        listeners[mode] = sock
    conn.send({mode: sock.getsockname()[1] for mode, sock in listeners.items()})
    ctx = server_context(tls)
    while (mode := conn.recv()) != "stop":
        conn.send(_receive(listeners[mode], ctx if mode == TLS else None, buf))


def _send(port: int, ctx: ssl.SSLContext | None, total: int, chunk: int) -> dict[str, Any]:
    """Connect and send `total` bytes from a thread; wall and CPU seconds, and cipher."""
    out: dict[str, Any] = {}

    def sender() -> None:
        data = memoryview(os.urandom(chunk))
        raw = socket.create_connection(("127.0.0.1", port))
        sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
        with sock:
            sent = 0
            while sent < total:
                n = min(chunk, total - sent)
                sock.sendall(data[:n])
                sent += n
            out["cipher"] = sock.cipher()[0] if ctx else "-"
            if ctx:
                sock = sock.unwrap()
            sock.shutdown(socket.SHUT_WR)

    start, cpu = time.perf_counter(), time.process_time()
    thread = threading.Thread(target=sender)
    thread.start()
    thread.join()
    out.update(seconds=time.perf_counter() - start, client_cpu=time.process_time() - cpu)
    return out


def _run_one(conn: Connection, mode: str, port: int, ctx: ssl.SSLContext | None,
             total: int, chunk: int, mib: int) -> dict[str, Any]:
    conn.send(mode)
    sent = _send(port, ctx, total, chunk)
    received = conn.recv()
    if received["bytes"] != total:
        raise RuntimeError(f"receiver got {received['bytes']} bytes, expected {total}")
    seconds = sent["seconds"]
    return {"mib_per_s": round(mib / seconds, 1), "seconds": round(seconds, 3),
            "client_cpu_s_per_gib": round(sent["client_cpu"] * 1024 / mib, 3),
            "server_cpu_s_per_gib": round(received["cpu"] * 1024 / mib, 3),
            "cipher": sent["cipher"]}


def _table(runs: dict[str, list[dict[str, Any]]], mib: int) -> Table:
    table = Table(title=f"blocking sockets in a thread, {mib} MiB over loopback")
    for column in ("mode", "median MiB/s", "sender CPU s/GiB", "receiver CPU s/GiB", "cipher"):
        table.add_column(column, justify="left" if column in ("mode", "cipher") else "right")
    for mode, values in runs.items():
        table.add_row(
            mode, f"{statistics.median(r['mib_per_s'] for r in values):,.0f}",
            f"{statistics.median(r['client_cpu_s_per_gib'] for r in values):.2f}",
            f"{statistics.median(r['server_cpu_s_per_gib'] for r in values):.2f}",
            values[0]["cipher"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=1024, help="sender write size")
    parser.add_argument("--read-kib", type=int, default=1024, help="receiver read size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    total, chunk = args.mib * MiB, args.chunk_kib * 1024
    runs: dict[str, list[dict[str, Any]]] = {PLAIN: [], TLS: []}
    with tempfile.TemporaryDirectory() as tmp:
        server_files, client_files = make_loopback_ca(Path(tmp))
        spawn = mp.get_context("spawn")
        conn, child = spawn.Pipe()
        receiver = spawn.Process(target=_receiver_process,
                                 args=(server_files, args.read_kib * 1024, child))
        receiver.start()
        ports = conn.recv()
        contexts = {PLAIN: None, TLS: client_context(client_files)}
        try:
            for _ in range(args.runs):
                for mode, ctx in contexts.items():
                    runs[mode].append(_run_one(conn, mode, ports[mode], ctx, total, chunk,
                                               args.mib))
        finally:
            conn.send("stop")
            receiver.join(10)
    medians, ratio = tls_over_plain(runs)
    Console().print(_table(runs, args.mib))
    Console().print(f"TLS / plain = {ratio:.0%}")
    report = {"mib": args.mib, "chunk_kib": args.chunk_kib, "read_kib": args.read_kib,
              "runs": runs, "median_mib_per_s": medians, "tls_over_plain": round(ratio, 3),
              "env": {"python": sys.version.split()[0], "openssl": ssl.OPENSSL_VERSION,
                      "cpus": os.cpu_count(), "load": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
