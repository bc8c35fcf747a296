"""Throughput of a streamed HTTP PUT over loopback with aiohttp: plain vs mutual TLS 1.3.

The server runs in its own process (one core each for sender and receiver, like two hosts),
with a throw-away godwit CA. Runs alternate plain/TLS to spread noise evenly.

    .venv/bin/python bench/tls_throughput.py [--mib 1024] [--runs 3] [--chunk-kib 1024]

Writes bench/results/tls_throughput.json. Target (issue 3): TLS >= 80 % of plain.

Besides MiB/s it reports the CPU seconds per GiB of each side, which is what TLS changes and
what stays meaningful on a busy machine: on loopback the slower side's CPU cost sets the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

from godwit.pki import CertificateAuthority
from godwit.tls import TLSFiles, client_context, server_context

RESULTS = Path(__file__).parent / "results" / "tls_throughput.json"
MiB = 1 << 20
T = TypeVar("T")
PLAIN, TLS = "plain", "mTLS"


async def _sink(request: web.Request) -> web.Response:
    """Read the whole body, count it, throw it away; report the CPU time and TLS cipher."""
    total, cpu = 0, time.process_time()
    while chunk := await request.content.readany():
        total += len(chunk)
    cipher = request.transport.get_extra_info("cipher") if request.transport else None
    reply = {"bytes": total, "cpu": time.process_time() - cpu, "cipher": (cipher or ["-"])[0]}
    return web.json_response(reply)


async def _serve(tls: TLSFiles, read_bufsize: int, conn: Connection) -> None:
    app = web.Application(handler_args={"read_bufsize": read_bufsize}, client_max_size=0)
    app.router.add_put("/sink", _sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for ctx in (None, server_context(tls)):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, ssl_context=ctx).start()
        ports.append(sock.getsockname()[1])
    conn.send(ports)
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    await runner.cleanup()


def _run(coro: Coroutine[Any, Any, T], uvloop: bool) -> T:
    """asyncio.run, on uvloop if asked (``pip install uvloop``; not a godwit dependency)."""
    if uvloop:
        import uvloop as uv

        return uv.run(coro)
    return asyncio.run(coro)


def _server_process(tls: TLSFiles, read_bufsize: int, conn: Connection, uvloop: bool) -> None:
    _run(_serve(tls, read_bufsize, conn), uvloop)


async def _body(total: int, chunk: int) -> AsyncIterator[memoryview]:
    data = memoryview(os.urandom(chunk))
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield data[:n]
        sent += n


async def _put(
    url: str, ctx: ssl.SSLContext | None, total: int, chunk: int, chunked: bool = False
) -> dict[str, Any]:
    """PUT ``total`` bytes: wall seconds (connection set-up included), CPU seconds of the
    client and of the server, and the cipher used. Without ``chunked``, the body is sent with
    a Content-Length (aiohttp then writes each chunk as is, no framing copy)."""
    headers = {} if chunked else {"Content-Length": str(total)}
    connector = aiohttp.TCPConnector(ssl=ctx if ctx else False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start, cpu = time.perf_counter(), time.process_time()
        async with session.put(url, data=_body(total, chunk), headers=headers) as resp:
            resp.raise_for_status()
            server = await resp.json()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if server["bytes"] != total:
        raise RuntimeError(f"server received {server['bytes']} bytes, expected {total}")
    return {
        "seconds": elapsed,
        "client_cpu": cpu,
        "server_cpu": server["cpu"],
        "cipher": server["cipher"],
    }


def make_loopback_ca(directory: Path) -> tuple[TLSFiles, TLSFiles]:
    """A throw-away godwit CA: a server identity for 127.0.0.1, and a client's."""
    ca = CertificateAuthority(directory / "ca")
    ca.init()
    ca.issue_agent("server", ["127.0.0.1"])
    ca.issue_client("client")
    return ca.bundle_for("server"), ca.bundle_for("client")


def tls_over_plain(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, float], float]:
    """Median MiB/s of each mode, and TLS's as a fraction of plain's."""
    medians = {mode: statistics.median(r["mib_per_s"] for r in v) for mode, v in runs.items()}
    return medians, medians[TLS] / medians[PLAIN]


def _summary(run: dict[str, Any], mib: int) -> dict[str, Any]:
    """Throughput and CPU use (% of one core, each side) of one run."""
    seconds = run["seconds"]
    return {
        "mib_per_s": round(mib / seconds, 1),
        "seconds": round(seconds, 3),
        "client_cpu_pct": round(100 * run["client_cpu"] / seconds),
        "server_cpu_pct": round(100 * run["server_cpu"] / seconds),
        "client_cpu_s_per_gib": round(run["client_cpu"] * 1024 / mib, 3),
        "server_cpu_s_per_gib": round(run["server_cpu"] * 1024 / mib, 3),
        "cipher": run["cipher"],
    }


def _table(runs: dict[str, list[dict[str, Any]]], mib: int, ratio: float) -> Table:
    count = max(len(v) for v in runs.values())
    table = Table(title=f"streamed PUT of {mib} MiB over loopback")
    table.add_column("mode")
    for i in range(count):
        table.add_column(f"run {i + 1}\nMiB/s", justify="right")
    table.add_column("median\nMiB/s", justify="right", style="bold")
    for side in ("client", "server"):
        table.add_column(f"{side} CPU\ns/GiB", justify="right")
        table.add_column(f"{side} CPU\nbusy", justify="right")
    for mode, values in runs.items():
        cells = [f"{r['mib_per_s']:,.0f}" for r in values]
        median = statistics.median(r["mib_per_s"] for r in values)
        cpu = []
        for side in ("client", "server"):
            cpu.append(f"{statistics.median(r[f'{side}_cpu_s_per_gib'] for r in values):.2f}")
            cpu.append(f"{statistics.median(r[f'{side}_cpu_pct'] for r in values):.0f} %")
        table.add_row(mode, *cells, f"{median:,.0f}", *cpu)
    verdict = "[green]ok[/green]" if ratio >= 0.8 else "[red]below target[/red]"
    table.caption = f"TLS / plain = {ratio:.0%} (target >= 80 %) {verdict}"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="payload size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=1024, help="client write size")
    parser.add_argument("--read-bufsize-kib", type=int, default=64, help="server read buffer")
    parser.add_argument("--chunked", action="store_true", help="chunked transfer encoding")
    parser.add_argument("--uvloop", action="store_true", help="run both sides on uvloop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    total, chunk = args.mib * MiB, args.chunk_kib * 1024

    with tempfile.TemporaryDirectory() as tmp:
        server_files, client_files = make_loopback_ca(Path(tmp))
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(
            target=_server_process,
            args=(server_files, args.read_bufsize_kib * 1024, child, args.uvloop),
        )
        proc.start()
        plain_port, tls_port = parent.recv()
        runs: dict[str, list[dict[str, Any]]] = {PLAIN: [], TLS: []}
        try:
            for _ in range(args.runs):
                for mode, url, tls in (
                    (PLAIN, f"http://127.0.0.1:{plain_port}/sink", False),
                    (TLS, f"https://127.0.0.1:{tls_port}/sink", True),
                ):
                    context = client_context(client_files) if tls else None
                    run = _run(_put(url, context, total, chunk, args.chunked), args.uvloop)
                    runs[mode].append(_summary(run, args.mib))
        finally:
            parent.send("stop")
            proc.join(10)

    medians, ratio = tls_over_plain(runs)
    Console().print(_table(runs, args.mib, ratio))
    report = {
        "mib": args.mib,
        "chunk_kib": args.chunk_kib,
        "read_bufsize_kib": args.read_bufsize_kib,
        "chunked": args.chunked,
        "uvloop": args.uvloop,
        "runs": runs,
        "median_mib_per_s": medians,
        "tls_over_plain": round(ratio, 3),
        "target": 0.8,
        "env": {
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "aiohttp": aiohttp.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
