"""What the benchmarks share: machine facts that tie figures to the code measured, tables
in Markdown, and a main() that cleans the testbed up on Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from godwit.cgroups import hierarchies
from godwit.runc import DEFAULT_RUNC

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

console = Console(width=None if sys.stdout.isatty() else 160)


def command_lines(argv: list[str]) -> list[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


def command_line(argv: list[str]) -> str:
    lines = [line.strip() for line in command_lines(argv) if line.strip()]
    return lines[0] if lines else "unknown"


def source_digest() -> str:
    """Hash of godwit's sources: ties figures to the code they measured (the tree is dirty)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "godwit").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "mem_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / (1 << 20), 1),
        "criu": command_line(["criu", "--version"]).removeprefix("Version: "),
        "runc": command_line([DEFAULT_RUNC, "--version"]).removeprefix("runc version "),
        "python": platform.python_version(),
        "godwit_commit": command_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "godwit_dirty": bool(command_lines(["git", "-C", str(ROOT), "status", "--porcelain"])),
        "godwit_tree_sha256": source_digest(),
        "state_fs": (f"/run: {command_line(['stat', '-f', '-c', '%T', '/run'])}; a testbed's"
                     " hosts: journaled ext4 on a loop device (godwit/lab/labfs.py)"),
        "loadavg_before": os.getloadavg(),
        "busy_processes_before": busy_processes(),
    }


def busy_processes(threshold_pct: float = 10.0) -> list[str]:
    """Other processes using CPU right now (one-second sample): they skew the figures."""
    out = command_lines(["top", "-b", "-c", "-n", "2", "-d", "1", "-w", "200"])
    last = max((i for i, line in enumerate(out) if line.lstrip().startswith("PID")), default=-1)
    busy = []
    for line in out[last + 1:]:
        fields = line.split(None, 11)
        if len(fields) == 12 and float(fields[8].replace(",", ".")) >= threshold_pct:
            busy.append(f"{fields[8]}% {fields[11][:80]}")
    return busy


def markdown(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


MAIN_PID = os.getpid()


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM cleans up like Ctrl-C, in this process only: children forked by pyroute2
    inherit the handler and must not tear the testbed down."""
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(bench: Callable[[], T], failure: type[Exception],
             report: Callable[[T], None]) -> int:
    """Run a benchmark as root, report it; exit 1 when it failed, 130 when interrupted
    (the testbed is cleaned up either way)."""
    if os.geteuid() != 0:
        console.print("[red]needs root (netns, runc, CRIU)[/red]")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = bench()
    except failure as exc:
        console.print(f"[bold red]BENCHMARK FAILED:[/bold red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; testbed cleaned up[/yellow]")
        return 130
    report(result)
    return 0


def remove_cgroup(rel: str, *, parents: bool = False) -> None:
    """rmdir ``rel`` (and, with ``parents``, its parents while empty) in every hierarchy;
    a cgroup still in use or missing stays as it is."""
    parts = Path(rel.strip("/")).parts
    last = 0 if parents else len(parts) - 1
    for hierarchy in hierarchies():
        for depth in range(len(parts), last, -1):
            with contextlib.suppress(OSError):
                (hierarchy / Path(*parts[:depth])).rmdir()
