"""How fast CRIU's dump moves pages: to a tmpfs, to a plain page server, to a TLS page server
(issue 17: the streamed stop-and-copy's freeze is bound by CRIU's TLS page path).

One memhog process holds N MiB of random memory; each run is `criu dump --leave-running`
of it, either into a tmpfs images directory or with `--page-server` against a
`criu page-server` on loopback (plain, or `--tls` with a throw-away godwit CA as godwit
gives it). Reported per variant, medians of the runs: the page phase's MiB/s (CRIU's own
memwrite time and pages written, from its stats-dump image), the dump's wall time, and the
CPU seconds per GiB of the dump and of the page server (wait4 rusage), which stay
meaningful on a loaded machine. Runs alternate variants and binaries to spread noise.

    .venv/bin/python bench/criu_pages.py [--mib 512,1024] [--runs 3]
        [--criu /usr/local/sbin/criu --criu /path/to/other/criu]

Writes bench/results/criu_pages.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import command_line, console, machine_info, markdown
from guest_memory import host_backed_memory
from rich.table import Table
from tls_throughput import make_loopback_ca

from godwit.criu import tls_argv
from godwit.criu_gate import _varint  # protobuf's varint, as the gate reads runc's request
from godwit.lab.memhog_process import MemhogError, start_memhog
from godwit.tls import TLSFiles

RESULTS = Path(__file__).parent / "results" / "criu_pages.json"
MEMHOG_READY_S = 120  # a memhog of several GiB filling its buffer
SHM = Path("/dev/shm")
MiB = 1 << 20
PAGE = 4096
TMPFS, PLAIN, TLS = "tmpfs", "plain", "TLS"
VARIANTS = (TMPFS, PLAIN, TLS)
STATS_FIELDS = {1: "freezing_us", 2: "frozen_us", 3: "memdump_us", 4: "memwrite_us",
                7: "pages_written"}  # dump_stats_entry in CRIU's images/stats.proto


class BenchError(Exception):
    """A run that did not complete: the figures would be meaningless."""


@dataclass(frozen=True)
class Identities:
    server: TLSFiles
    client: TLSFiles


def dump_stats(images: Path) -> dict[str, int]:
    """The dump's timings and page counts from its stats-dump image: an 8-byte image header,
    a 32-bit size, then StatsEntry { dump_stats_entry dump = 1 } (all varint fields)."""
    data = (images / "stats-dump").read_bytes()[12:]
    key, pos = _varint(data, 0)
    if key != (1 << 3 | 2):
        raise BenchError("stats-dump holds no dump statistics")
    size, pos = _varint(data, pos)
    stats, end = {}, pos + size
    while pos < end:
        key, pos = _varint(data, pos)
        if key & 7 != 0:
            raise BenchError(f"unexpected field type in stats-dump: {key}")
        value, pos = _varint(data, pos)
        if key >> 3 in STATS_FIELDS:
            stats[STATS_FIELDS[key >> 3]] = value
    return stats


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(rusage: Any) -> float:
    return rusage.ru_utime + rusage.ru_stime


def wait_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int, Any]:
    """Reap `proc` with wait4 (its exit code and rusage); killed past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.005)


def log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = [line for line in lines if line.startswith("Error")]
    return (errors or lines or ["no log"])[-1]


def start_serving(argv: list[str], log: Path, what: str) -> subprocess.Popen:
    """A CRIU command that serves pages, returned once it says so on its status fd."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([*argv, "--status-fd", str(write_end)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(write_end,))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as status:
        if status.read(1) != b"\0":
            wait_rusage(proc, 5)
            raise BenchError(f"{what} did not start: {log_tail(log)}")
    return proc


def start_page_server(criu: str, directory: Path, port: int,
                      tls: TLSFiles | None) -> subprocess.Popen:
    """`criu page-server` for one dump, returned once it listens."""
    return start_serving(
        [criu, "page-server", "-D", str(directory), "--address", "127.0.0.1", "--port",
         str(port), "-v2", "-o", "ps.log", *tls_argv(tls, check_peer_name=False)],
        directory / "ps.log", "page server")


def dump_once(criu: str, pid: int, variant: str, ids: Identities, work: Path) -> dict[str, Any]:
    """One `criu dump --leave-running` of `pid`; its figures, and the server's."""
    images, received = work / "images", work / "received"
    images.mkdir()
    argv = [criu, "dump", "-t", str(pid), "-D", str(images), "--leave-running", "-v2",
            "-o", "dump.log"]
    server = None
    if variant != TMPFS:
        received.mkdir()
        port = free_port()
        tls = ids.server if variant == TLS else None
        server = start_page_server(criu, received, port, tls)
        argv += ["--page-server", "--address", "127.0.0.1", "--port", str(port),
                 *tls_argv(ids.client if variant == TLS else None)]
    start = time.perf_counter()
    dump = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rc, dump_usage = wait_rusage(dump, 300)
    seconds = time.perf_counter() - start
    server_cpu = None
    if server:
        server_rc, server_usage = wait_rusage(server, 30 if rc == 0 else 1)
        if server_rc != 0 and rc == 0:
            raise BenchError(f"page server exit {server_rc}: {log_tail(received / 'ps.log')}")
        server_cpu = cpu_seconds(server_usage)
        server_rss_mib = server_usage.ru_maxrss / 1024
    if rc != 0:
        raise BenchError(f"{variant} dump exit {rc}: {log_tail(images / 'dump.log')}")
    stats = dump_stats(images)
    page_bytes = stats["pages_written"] * PAGE
    landed = sum(p.stat().st_size for p in (received if server else images).glob("pages-*.img"))
    if landed != page_bytes:
        raise BenchError(f"{variant}: {landed} bytes of pages landed, {page_bytes} written")
    gib = page_bytes / (1 << 30)
    result = {"seconds": round(seconds, 3),
              "page_mib_per_s": round(page_bytes / MiB / (stats["memwrite_us"] / 1e6), 1),
              "dump_cpu_s_per_gib": round(cpu_seconds(dump_usage) / gib, 3),
              "dump_rss_mib": round(dump_usage.ru_maxrss / 1024, 1), **stats}
    if server:
        result.update(server_cpu_s_per_gib=round(server_cpu / gib, 3),
                      server_rss_mib=round(server_rss_mib, 1))
    return result


def bench_size(mib: int, binaries: list[str], runs: int, ids: Identities,
               work: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every (binary, variant) `runs` times against one memhog of `mib` MiB."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        criu: {variant: [] for variant in VARIANTS} for criu in binaries}
    memhog = start_memhog(work, mib, timeout=MEMHOG_READY_S)
    try:
        for run in range(runs):
            for criu in binaries:
                for variant in VARIANTS:
                    run_dir = Path(tempfile.mkdtemp(prefix=f"run{run}-", dir=work))
                    try:
                        results[criu][variant].append(
                            dump_once(criu, memhog.proc.pid, variant, ids, run_dir))
                    finally:
                        shutil.rmtree(run_dir, ignore_errors=True)
        if not memhog.read().startswith("ready"):
            raise BenchError(f"memhog's state after the dumps: {memhog.read()!r}")
    finally:
        memhog.stop()
    return results


def median(values: list[dict[str, Any]], key: str) -> float | None:
    present = [v[key] for v in values if v.get(key) is not None]
    return statistics.median(present) if present else None


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mib, by_binary in report["results"].items():
        for criu, by_variant in by_binary.items():
            for variant, values in by_variant.items():
                server = median(values, "server_cpu_s_per_gib")
                rss = median(values, "server_rss_mib")
                rows.append([
                    mib, report["binaries"][criu], variant,
                    f"{median(values, 'page_mib_per_s'):,.0f}",
                    f"{median(values, 'seconds'):.2f}",
                    f"{median(values, 'dump_cpu_s_per_gib'):.2f}",
                    "-" if server is None else f"{server:.2f}",
                    "-" if rss is None else f"{rss:,.0f}"])
    return rows


HEADER = ["MiB", "criu", "variant", "page MiB/s", "dump s", "dump CPU s/GiB",
          "server CPU s/GiB", "server max RSS MiB"]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in ("criu", "variant") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_report(report: dict[str, Any]) -> None:
    print_table("CRIU dump page phase (medians), loopback", HEADER, summary_rows(report))
    console.print(f"load average before {report['env']['loadavg_before']}, "
                  f"after {report['env']['loadavg_after']}")


def criu_arguments(description: str, default_mib: str, results: Path) -> argparse.Namespace:
    """The command line the CRIU-alone benches share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mib", default=default_mib, help="comma-separated sizes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--criu", action="append", help="CRIU binary (repeat to compare)")
    parser.add_argument("--out", type=Path, default=results)
    parser.add_argument("--host-backed-memory", action="store_true",
                        help="on a VM with free page reporting: stop it for the run and "
                             "touch the free memory first (bench/guest_memory.py)")
    return parser.parse_args()


SizeBench = Callable[[int, list[str], int, Identities, Path], dict[str, Any]]


def run_criu_bench(args: argparse.Namespace, bench: SizeBench, prefix: str
                   ) -> dict[str, Any] | None:
    """Every size of `args` through `bench`, in a /dev/shm work dir with a throw-away CA;
    the report, or None (said why) when a run failed or this is not root."""
    binaries = [shutil.which(c) or c for c in (args.criu or ["criu"])]
    if os.geteuid() != 0:
        console.print("[red]needs root (CRIU dumps)[/red]")
        return None
    labels = {criu: f"{criu} ({command_line([criu, '--version']).removeprefix('Version: ')})"
              for criu in binaries}
    env = machine_info()
    results = {}
    memory = host_backed_memory() if args.host_backed_memory else contextlib.nullcontext({})
    with memory as guest, tempfile.TemporaryDirectory(dir=SHM, prefix=prefix) as tmp:
        env["guest_memory"] = guest
        work = Path(tmp)
        ids = Identities(*make_loopback_ca(work))
        try:
            for mib in (int(m) for m in args.mib.split(",")):
                results[str(mib)] = bench(mib, binaries, args.runs, ids, work)
        except (BenchError, MemhogError) as exc:
            console.print(f"[bold red]BENCHMARK FAILED:[/bold red] {exc}")
            return None
    env["loadavg_after"] = os.getloadavg()
    return {"runs": args.runs, "binaries": labels, "results": results, "env": env}


def write_report(report: dict[str, Any], out: Path, header: list[str],
                 rows: list[list[str]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(header, rows) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def main() -> int:
    args = criu_arguments(__doc__.splitlines()[0], "512,1024", RESULTS)
    report = run_criu_bench(args, bench_size, "criu-pages-")
    if report is None:
        return 1
    print_report(report)
    write_report(report, args.out, HEADER, summary_rows(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
