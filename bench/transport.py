"""Throughput of godwit.transport through a real aiohttp PUT on loopback.

Cases: one big file (default 1 GiB, memory-image-like content: random, zero and text pages)
and a tree of many small files (default 10 000, 0-16 KiB of text), each plain and zstd.
The receiver is a separate process (its own event loop and GIL), like on a real host, but
both share this machine's CPUs; so the big file is also measured per side: sender only
(stream discarded) and receiver only (stream replayed from memory), in this process.
Data lives in --workdir (default /dev/shm, to measure the transport rather than the disk).

    .venv/bin/python bench/transport.py [--big-mib 1024] [--files 10000] [--runs 3]

Also the same big file over mutual TLS 1.3 (the agents' data plane), against plain HTTP.
The PUTs also give each side's CPU seconds per GiB: with both ends on this machine's CPUs,
what TLS adds to them, not the link, sets its rate.
Prints a table and writes bench/results/transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from godwit import transport
from godwit.pki import CertificateAuthority
from godwit.tls import client_context, server_context

RESULTS = Path(__file__).resolve().parent / "results" / "transport.json"
MiB = 1 << 20
WORDS = (
    b"container checkpoint restore page memory image socket process thread "
    b"namespace cgroup mount inode dentry kernel runc criu migrate freeze thaw "
).split()


# ------------------------------------------------------------------------ data


def _text(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += rng.choice(WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


def make_big(path: Path, mib: int) -> None:
    """Pages like a process image: 50 % random, 25 % zero, 25 % text."""
    rng = random.Random(1)
    text = _text(rng, 64 * 4096)
    zero = bytes(4096)
    with open(path, "wb") as f:
        for _ in range(mib):
            rnd = os.urandom(128 * 4096)
            pages = []
            for i in range(256):
                r = rng.random()
                if r < 0.5:
                    pages.append(rnd[(i % 128) * 4096 : (i % 128 + 1) * 4096])
                elif r < 0.75:
                    pages.append(zero)
                else:
                    k = rng.randrange(64) * 4096
                    pages.append(text[k : k + 4096])
            f.write(b"".join(pages))


def make_small(root: Path, n: int) -> None:
    rng = random.Random(2)
    text = _text(rng, 1 * MiB)
    for i in range(n):
        d = root / f"d{i % 100:02d}" / f"s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = min(16384, int(rng.expovariate(1 / 3000)))
        k = rng.randrange(len(text) - size)
        (d / f"f{i:05d}.txt").write_bytes(text[k : k + size])


# ------------------------------------------------------------------------ server


def make_ca(directory: Path) -> CertificateAuthority:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""
    ca = CertificateAuthority(directory)
    ca.init("godwit bench CA")
    ca.issue_agent("server", ["127.0.0.1"])
    ca.issue_client("client")
    return ca


def serve(dest_root: Path, read_bufsize: int, ca_dir: Path | None = None) -> None:
    async def put(request: web.Request) -> web.Response:
        dest = dest_root / request.match_info["name"]
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.monotonic()
        stats = await transport.receive_tree(request.content, dest)
        return web.json_response(
            {
                "files": stats.files,
                "bytes": stats.bytes,
                "wire_bytes": stats.wire_bytes,
                "seconds": time.monotonic() - t0,
            }
        )

    async def main() -> None:
        app = web.Application()
        app.router.add_put("/tree/{name}", put)
        runner = web.AppRunner(app, access_log=None, read_bufsize=read_bufsize)
        await runner.setup()
        ssl_context = None
        if ca_dir:
            ssl_context = server_context(CertificateAuthority(ca_dir).bundle_for("server"))
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------------------ client


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_run(url: str, root: Path, compress: bool, receiver_pid: int,
                  ssl_context=None) -> dict:
    """One PUT of the tree; wall time, and each side's CPU seconds per GiB of payload."""
    cpu0, receiver_cpu0 = time.process_time(), process_cpu_s(receiver_pid)
    t0 = time.monotonic()
    plan = transport.plan_tree(root)
    t_plan = time.monotonic() - t0
    stream = transport.send_tree(plan, compress=compress)
    connector = aiohttp.TCPConnector(ssl=ssl_context or False)
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.put(url, data=stream) as resp:
        body = await resp.json()
        resp.raise_for_status()
    seconds = time.monotonic() - t0
    gib = plan.total_bytes / (1 << 30)
    assert body["bytes"] == plan.total_bytes, body
    return {
        "seconds": seconds,
        "plan_seconds": t_plan,
        "payload_bytes": plan.total_bytes,
        "wire_bytes": stream.stats.wire_bytes,
        "files": stream.stats.files,
        "receiver_seconds": body["seconds"],
        "sender_cpu_s_per_gib": round((time.process_time() - cpu0) / gib, 3),
        "receiver_cpu_s_per_gib": round((process_cpu_s(receiver_pid) - receiver_cpu0) / gib, 3),
    }


async def sender_only(root: Path, compress: bool) -> dict:
    t0 = time.monotonic()
    plan = transport.plan_tree(root)
    stream = transport.send_tree(plan, compress=compress)
    async for _ in stream:
        pass
    return {
        "seconds": time.monotonic() - t0,
        "payload_bytes": plan.total_bytes,
        "wire_bytes": stream.stats.wire_bytes,
        "files": stream.stats.files,
    }


async def receiver_only(root: Path, dest: Path, compress: bool) -> dict:
    stream = transport.send_tree(transport.plan_tree(root), compress=compress)
    data = b"".join([chunk async for chunk in stream])
    pieces = [data[i : i + (256 << 10)] for i in range(0, len(data), 256 << 10)]
    del data

    async def replay():
        for p in pieces:
            yield p

    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.monotonic()
    stats = await transport.receive_tree(replay(), dest)
    seconds = time.monotonic() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return {
        "seconds": seconds,
        "payload_bytes": stats.bytes,
        "wire_bytes": stats.wire_bytes,
        "files": stats.files,
    }


async def best_of(runs: int, case: str, compress: bool, fn, *args) -> dict:
    res = [await fn(*args) for _ in range(runs)]
    best = min(res, key=lambda r: r["seconds"])
    best.update(
        case=case,
        compress=compress,
        runs=[round(r["seconds"], 3) for r in res],
        payload_MBps=best["payload_bytes"] / best["seconds"] / 1e6,
        files_per_s=best["files"] / best["seconds"],
    )
    return best


async def run_all(plain: tuple[str, int], big: Path, small: Path, dest: Path, runs: int,
                  tls: tuple[str, int], tls_context: ssl.SSLContext) -> list[dict]:
    """Every case; `plain` and `tls` are a receiver's URL and process id."""
    (url, pid), (tls_url, tls_pid) = plain, tls
    out = []
    for name, root in (("big", big), ("small", small)):
        for compress in (False, True):
            out.append(await best_of(runs, name, compress, one_run, f"{url}/{name}", root,
                                     compress, pid))
    out.append(await best_of(runs, "big, mutual TLS", False, one_run, f"{tls_url}/big", big,
                             False, tls_pid, tls_context))
    for compress in (False, True):
        out.append(await best_of(runs, "big, send only", compress, sender_only, big, compress))
        out.append(
            await best_of(
                runs, "big, recv only", compress, receiver_only, big, dest / "r", compress
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--read-bufsize", type=int, default=1 << 20, help="aiohttp server")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ca-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.read_bufsize, args.ca_dir)
        return

    console = Console(width=None if sys.stdout.isatty() else 150)
    work = Path(tempfile.mkdtemp(prefix="godwit-bench-", dir=args.workdir))
    server = tls_server = None
    try:
        src = work / "src"
        big, small = src / "big", src / "small"
        big.mkdir(parents=True)
        small.mkdir()
        with console.status("generating data"):
            make_big(big / "pages-1.img", args.big_mib)
            make_small(small, args.files)
        (work / "dst").mkdir()
        ca = make_ca(work / "ca")
        argv = [sys.executable, __file__, "--serve", str(work / "dst"),
                "--read-bufsize", str(args.read_bufsize)]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        tls_server = subprocess.Popen([*argv, "--ca-dir", str(work / "ca")],
                                      stdout=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/tree"
        tls_url = f"https://127.0.0.1:{int(tls_server.stdout.readline())}/tree"
        tls = client_context(ca.bundle_for("client"))
        with console.status("running"):
            results = asyncio.run(run_all((url, server.pid), big, small, work / "dst",
                                          args.runs, (tls_url, tls_server.pid), tls))
    finally:
        for process in (server, tls_server):
            if process is not None:
                process.terminate()
                process.wait()
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"godwit.transport over aiohttp PUT, loopback ({os.cpu_count()} CPUs)")
    cols = (
        "case",
        "zstd",
        "files",
        "payload MiB",
        "wire MiB",
        "ratio",
        "best s",
        "MB/s",
        "files/s",
        "send CPU s/GiB",
        "recv CPU s/GiB",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "case" else "right", no_wrap=True)
    for r in results:
        table.add_row(
            r["case"],
            "yes" if r["compress"] else "no",
            str(r["files"]),
            f"{r['payload_bytes'] / MiB:.0f}",
            f"{r['wire_bytes'] / MiB:.1f}",
            f"{r['payload_bytes'] / r['wire_bytes']:.2f}",
            f"{r['seconds']:.2f}",
            f"{r['payload_MBps']:.0f}",
            f"{r['files_per_s']:.0f}" if r["files"] > 1 else "-",
            f"{r['sender_cpu_s_per_gib']:.2f}" if "sender_cpu_s_per_gib" in r else "-",
            f"{r['receiver_cpu_s_per_gib']:.2f}" if "receiver_cpu_s_per_gib" in r else "-",
        )
    console.print(table)
    by_case = {(r["case"], r["compress"]): r["payload_MBps"] for r in results}
    tls_ratio = by_case[("big, mutual TLS", False)] / by_case[("big", False)]
    console.print(f"data plane with mutual TLS: {tls_ratio:.0%} of plain HTTP (1 big file)")
    cpu = {r["case"]: r for r in results if not r["compress"] and "sender_cpu_s_per_gib" in r}
    plain, tls = cpu["big"], cpu["big, mutual TLS"]
    console.print("CPU s/GiB, plain → mutual TLS: sender "
                  f"{plain['sender_cpu_s_per_gib']:.2f} → {tls['sender_cpu_s_per_gib']:.2f}, "
                  f"receiver {plain['receiver_cpu_s_per_gib']:.2f} → "
                  f"{tls['receiver_cpu_s_per_gib']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "params": {k: str(v) for k, v in vars(args).items() if k != "serve"},
                "results": results,
                "tls_over_plain": round(tls_ratio, 3),
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
