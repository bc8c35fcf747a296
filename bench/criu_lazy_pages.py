"""How fast CRIU's post-copy moves pages: a lazy dump's page server to a lazy-pages daemon,
plain or TLS (issue 17: post-copy's page phase is bound by these two CRIU processes).

Each run starts a memhog of N MiB of random memory alone in a pid namespace and dumps it
with `criu dump --lazy-pages`, which keeps the stopped task and serves its memory on
loopback. `criu lazy-pages --page-server` fetches it, and `criu restore --lazy-pages`
brings the task back in a new pid namespace; the run ends when the daemon has every page,
and the restored memhog must then find its memory intact. Reported per variant, medians of
the runs: the fill's MiB/s (from the restore's start to the daemon's exit), and the CPU
seconds per GiB of the daemon and of the dump, which serves the pages (wait4 rusage; the
dump's includes the dump itself). Runs alternate variants and binaries to spread noise.

    .venv/bin/python bench/criu_lazy_pages.py [--mib 1024] [--runs 3] [--host-backed-memory]
        [--criu /usr/local/sbin/criu --criu /path/to/other/criu]

Without --host-backed-memory, on a VM with free page reporting, a run whose restore lands
on memory the host took back costs the daemon 2-6 times the CPU (1 GiB plain: 0.45 to
2.9 s/GiB in one session).

Writes bench/results/criu_lazy_pages.json.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from criu_pages import (
    MEMHOG_READY_S,
    BenchError,
    Identities,
    cpu_seconds,
    criu_arguments,
    free_port,
    log_tail,
    print_table,
    run_criu_bench,
    start_serving,
    wait_rusage,
    write_report,
)

from godwit import procfs
from godwit.criu import LAZY_SOCKET, tls_argv
from godwit.lab.memhog_process import in_pid_namespace, start_memhog, verified_state

RESULTS = Path(__file__).parent / "results" / "criu_lazy_pages.json"
PLAIN, TLS = "plain", "TLS"
VARIANTS = (PLAIN, TLS)
FILL_TIMEOUT_S = 300


def lazy_dump(criu: str, pid: int, images: Path, port: int,
              tls: Any) -> subprocess.Popen:
    """`criu dump --lazy-pages` of `pid`, returned once its page server listens."""
    return start_serving(
        [criu, "dump", "-t", str(pid), "-D", str(images), "--lazy-pages", "--address",
         "127.0.0.1", "--port", str(port), "-v2", "-o", "dump.log",
         *tls_argv(tls, check_peer_name=False)],
        images / "dump.log", "lazy dump")


def start_daemon(criu: str, images: Path, work: Path, port: int, tls: Any) -> subprocess.Popen:
    """`criu lazy-pages` against the dump's page server, returned once its socket listens."""
    daemon = subprocess.Popen(
        [criu, "lazy-pages", "-D", str(images), "-W", str(work), "--page-server",
         "--address", "127.0.0.1", "--port", str(port), "-v2", "-o", "lazy.log",
         *tls_argv(tls)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not procfs.unix_listening(daemon.pid, LAZY_SOCKET):
        if daemon.poll() is not None or time.monotonic() > deadline:
            wait_rusage(daemon, 1)
            raise BenchError(f"lazy-pages did not start: {log_tail(work / 'lazy.log')}")
        time.sleep(0.002)
    return daemon


def post_copy_once(criu: str, mib: int, variant: str, ids: Identities,
                   work: Path) -> dict[str, Any]:
    """One lazy dump, lazy restore and fill of a fresh memhog; its figures."""
    images, lazy_work = work / "images", work / "work"
    images.mkdir()
    lazy_work.mkdir()
    hog = start_memhog(work, mib, in_pid_namespace, timeout=MEMHOG_READY_S)
    server_tls, client_tls = (ids.server, ids.client) if variant == TLS else (None, None)
    try:
        port = free_port()
        dump = lazy_dump(criu, hog.pid_in_namespace(), images, port, server_tls)
        daemon = start_daemon(criu, images, lazy_work, port, client_tls)
        start = time.perf_counter()
        restore = subprocess.run(
            [criu, "restore", "-D", str(images), "-W", str(lazy_work), "-d", "--lazy-pages",
             "--pidfile", str(work / "restored.pid"), "-v2", "-o", "restore.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemon_rc, daemon_usage = wait_rusage(daemon, FILL_TIMEOUT_S)
        seconds = time.perf_counter() - start
        dump_rc, dump_usage = wait_rusage(dump, 30)
        if restore.returncode or daemon_rc or dump_rc:
            raise BenchError(f"{variant}: restore {restore.returncode} "
                             f"({log_tail(lazy_work / 'restore.log')}), lazy-pages {daemon_rc} "
                             f"({log_tail(lazy_work / 'lazy.log')}), dump {dump_rc} "
                             f"({log_tail(images / 'dump.log')})")
        verified = verified_state(hog, int((work / "restored.pid").read_text()))
        if " ok=1 " not in verified:
            raise BenchError(f"restored memhog's memory differs: {verified!r}")
    finally:
        hog.stop()
    gib = mib / 1024
    return {"seconds": round(seconds, 3), "fill_mib_per_s": round(mib / seconds, 1),
            "daemon_cpu_s_per_gib": round(cpu_seconds(daemon_usage) / gib, 3),
            "dump_cpu_s_per_gib": round(cpu_seconds(dump_usage) / gib, 3)}


def bench_size(mib: int, binaries: list[str], runs: int, ids: Identities,
               work: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every (binary, variant) `runs` times with a memhog of `mib` MiB."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        criu: {variant: [] for variant in VARIANTS} for criu in binaries}
    for run in range(runs):
        for criu in binaries if run % 2 == 0 else reversed(binaries):
            for variant in VARIANTS:
                run_dir = Path(tempfile.mkdtemp(prefix=f"run{run}-", dir=work))
                try:
                    results[criu][variant].append(
                        post_copy_once(criu, mib, variant, ids, run_dir))
                finally:
                    shutil.rmtree(run_dir, ignore_errors=True)
    return results


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mib, by_binary in report["results"].items():
        for criu, by_variant in by_binary.items():
            for variant, values in by_variant.items():
                def median(key: str, values: list[dict[str, Any]] = values) -> float:
                    return statistics.median(v[key] for v in values)
                rows.append([mib, report["binaries"][criu], variant,
                             f"{median('fill_mib_per_s'):,.0f}", f"{median('seconds'):.2f}",
                             f"{median('daemon_cpu_s_per_gib'):.2f}",
                             f"{median('dump_cpu_s_per_gib'):.2f}"])
    return rows


HEADER = ["MiB", "criu", "variant", "fill MiB/s", "fill s", "lazy-pages CPU s/GiB",
          "dump + page server CPU s/GiB"]


def main() -> int:
    args = criu_arguments(__doc__.splitlines()[0], "1024", RESULTS)
    report = run_criu_bench(args, bench_size, "criu-lazy-")
    if report is None:
        return 1
    print_table("CRIU post-copy fill (medians), loopback", HEADER, summary_rows(report))
    write_report(report, args.out, HEADER, summary_rows(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
