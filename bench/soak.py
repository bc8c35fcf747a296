"""Soak: many round trips of a TCP server between two hosts under a continuous client,
counting failures, client-visible errors and what the hosts hold before and after.

    .venv/bin/python bench/soak.py [--round-trips 200] [--out bench/results/soak.json]

Two netns hosts sa and sb with agents (godwit.lab.testbed) and a client host sc. A netserver
container with its own address runs on sa; a client on sc keeps one TCP connection open
and sends a numbered request every 10 ms for the whole run (tests/netclient.py). Each
round trip migrates it sa → sb → sa, the strategies alternating per migration
(stop-and-copy, post-copy, ...). After one warm-up round trip (lazily made directories,
the CRIU gate script) the hosts' resources are counted; after the last one (and a few
seconds for background clean-ups) they are counted again. The goal is zero growth of:
open fds of both agents, netns, mounts, iptables rules and chains of the host netns,
cgroups under godwit's hierarchy, runc state entries, files and bytes in the state dirs.
Reports (`<state>/reports/`, one JSON file per migration: the history) and the agents' own
log files grow by design; they are counted apart. The client's stream must stay intact:
every request answered once, in order, on the one connection.

Prints a table and writes JSON (with the git commit and machine facts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the network tests' client

from netclient import Client  # noqa: E402

from godwit.cgroups import hierarchies  # noqa: E402
from godwit.lab.netns import TestHost, pick_free_subnet  # noqa: E402
from godwit.lab.testbed import Testbed  # noqa: E402
from godwit.lab.workloads import netserver_bundle  # noqa: E402
from godwit.runc import DEFAULT_RUNC  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "soak.json"
STRATEGIES = ("stop-and-copy", "post-copy")
HOSTS = ("sa", "sb")
NAME = f"soak{os.getpid() % 100000}"  # cgroup paths are /godwit/<host>/<name>: unique per run
SETTLE_S = 5.0  # background clean-ups (fence watchdogs, idle expiries) after the last move
MIGRATE_TIMEOUT_S = 120
BYTES_NOISE = 64
BY_DESIGN = ("reports", "agent.log", "audit.log")  # grow with every migration (bounded)


def snapshot(bed: Testbed) -> dict[str, int]:
    """What the two hosts hold now, counted only within this testbed."""
    counts: dict[str, int] = {}
    for name in HOSTS:
        host = bed.host(name)
        counts[f"{name} agent fds"] = len(os.listdir(f"/proc/{bed.agents[name].pid}/fd"))
        counts[f"{name} runc state entries"] = len(list(host.runc_root.iterdir()))
        counts[f"{name} cgroups"] = _cgroups(name)
        rules, chains = _iptables(host)
        counts[f"{name} iptables rules"], counts[f"{name} iptables chains"] = rules, chains
        files, size = _tree(host.state_dir, skip=BY_DESIGN)
        counts[f"{name} state files"], counts[f"{name} state bytes"] = files, size
        reports, _ = _tree(host.state_dir / "reports")
        counts[f"{name} reports (history, by design)"] = reports
    counts["netns"] = len([n for n in _netns() if bed.prefix in n])
    counts["mounts"] = sum(bed.prefix in line for line in
                           Path("/proc/self/mountinfo").read_text().splitlines())
    return counts


def _cgroups(host: str) -> int:
    """Cgroups under godwit/<host> in every hierarchy (v1 controllers, unified, or v2)."""
    total = 0
    for hierarchy in hierarchies():
        base = hierarchy / "godwit" / host
        if base.is_dir():
            total += 1 + sum(len(dirs) for _, dirs, _ in os.walk(base))
    return total


def _iptables(host: TestHost) -> tuple[int, int]:
    out = subprocess.run(["ip", "netns", "exec", host.netns, "iptables-save"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return sum(line.startswith("-A") for line in out), sum(line.startswith(":") for line in out)


def _tree(root: Path, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(files, bytes) under root, leaving out top-level entries named in skip."""
    files = size = 0
    for entry in root.iterdir() if root.is_dir() else []:
        if entry.name in skip:
            continue
        paths = [entry] if not entry.is_dir() or entry.is_symlink() else \
            [Path(d) / f for d, _, names in os.walk(entry) for f in names]
        for path in paths:
            try:
                size += path.lstat().st_size
            except OSError:
                continue
            files += 1
    return files, size


def _netns() -> list[str]:
    return os.listdir("/run/netns") if os.path.isdir("/run/netns") else []


def migrate(bed: Testbed, dest: str, strategy: str) -> dict[str, Any]:
    """One migration through the CLI; its report (or the CLI's error)."""
    result = bed.godwit("migrate", NAME, "--to", dest, "--strategy", strategy, "--json",
                        timeout=MIGRATE_TIMEOUT_S)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = {"result": "error", "error": (result.stderr or result.stdout).strip()[-300:]}
    return {"to": dest, "strategy": strategy, "result": report.get("result"),
            "error": report.get("error"), "downtime_s": report.get("downtime_s"),
            "total_s": report.get("total_s")}


def start_server(bed: Testbed) -> str:
    address = str(list(bed.net.subnet.hosts())[200])
    bundle = netserver_bundle(bed.bundle_dir(NAME))
    result = bed.godwit("run", NAME, "--bundle", str(bundle), "--host", HOSTS[0],
                        "--ip", f"{address}/{bed.net.subnet.prefixlen}",
                        "--gateway", bed.net.gateway)
    if result.returncode != 0:
        raise RuntimeError(f"cannot start the server: {result.stderr.strip()}")
    return address


def round_trip(bed: Testbed, index: int) -> list[dict[str, Any]]:
    """sa → sb → sa; strategies alternate per migration."""
    return [migrate(bed, dest, STRATEGIES[(2 * index + leg) % len(STRATEGIES)])
            for leg, dest in enumerate((HOSTS[1], HOSTS[0]))]


def soak(bed: Testbed, client_host: TestHost, round_trips: int,
         progress: Callable[[int, list[dict]], None] = lambda i, m: None) -> dict[str, Any]:
    """Run the soak on a testbed; returns migrations, client figures and counts."""
    address = start_server(bed)
    client = Client(client_host, address, socket.SOCK_STREAM)
    migrations: list[dict[str, Any]] = []
    try:
        client.wait_replies(50)
        migrations += round_trip(bed, 0)  # warm-up
        time.sleep(SETTLE_S)
        before = snapshot(bed)
        began = time.monotonic()
        for index in range(1, round_trips + 1):
            migrations += round_trip(bed, index)
            progress(index, migrations)
        elapsed = time.monotonic() - began
        client.wait_replies(50)
        time.sleep(SETTLE_S)
        after = snapshot(bed)
    finally:
        client.close()
        bed.godwit("rm", NAME)
    return {"migrations": migrations, "seconds": elapsed, "before": before, "after": after,
            "client": client_figures(client)}


def client_figures(client: Client) -> dict[str, Any]:
    numbers = [n for _, n, _ in client.replies]
    return {"replies": len(client.replies), "errors": client.errors,
            "in_order": numbers == list(range(1, len(numbers) + 1)),
            "server_counted_each_once": all(n == c for _, n, c in client.replies),
            "max_stall_s": round(client.max_stall(), 3) if len(client.replies) > 1 else None}


def growth(result: dict[str, Any]) -> dict[str, int]:
    """Counts that grew, leaving out what grows by design; state bytes may move by a few
    bytes (a JSON record's timestamps differ in length from one copy to the next)."""
    grown = {}
    for key, value in result["before"].items():
        delta = result["after"][key] - value
        if delta > (BYTES_NOISE if key.endswith("bytes") else 0) and "by design" not in key:
            grown[key] = delta
    return grown


def failures(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in result["migrations"] if m["result"] != "ok"]


def client_errors(result: dict[str, Any]) -> list[str]:
    client = result["client"]
    problems = list(client["errors"])
    if not client["in_order"]:
        problems.append("a reply was lost or duplicated")
    if not client["server_counted_each_once"]:
        problems.append("the server lost or repeated a request")
    return problems


def run(round_trips: int, progress: Callable[[int, list[dict]], None] = lambda i, m: None,
        ) -> dict[str, Any]:
    """A testbed of its own (hosts sa, sb, client host sc), the soak, the testbed gone."""
    prefix = f"gws{os.getpid() % 100000}"
    with Testbed(list(HOSTS), prefix=prefix, subnet=pick_free_subnet()) as bed:
        client_host = bed.net.add_host("sc")
        return soak(bed, client_host, round_trips, progress)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    ok = [m for m in result["migrations"] if m["result"] == "ok"]
    by_strategy = {}
    for strategy in STRATEGIES:
        downtimes = [m["downtime_s"] for m in ok if m["strategy"] == strategy]
        if downtimes:
            by_strategy[strategy] = {
                "migrations": len(downtimes),
                "downtime_median_ms": round(statistics.median(downtimes) * 1e3),
                "downtime_max_ms": round(max(downtimes) * 1e3)}
    return {"migrations": len(result["migrations"]), "failures": len(failures(result)),
            "client_errors": client_errors(result), "growth": growth(result),
            "by_strategy": by_strategy}


def print_table(result: dict[str, Any], round_trips: int) -> None:
    facts = summary(result)
    print(f"\n{round_trips} round trips, {facts['migrations']} migrations in "
          f"{result['seconds']:.0f} s: {facts['failures']} failed; client: "
          f"{result['client']['replies']} replies, errors {facts['client_errors'] or 'none'}, "
          f"max stall {result['client']['max_stall_s']} s")
    for strategy, figures in facts["by_strategy"].items():
        print(f"  {strategy}: {figures['migrations']} migrations, downtime median "
              f"{figures['downtime_median_ms']} ms, max {figures['downtime_max_ms']} ms")
    width = max(len(k) for k in result["before"])
    print(f"\n{'resource':<{width}}  {'before':>10}  {'after':>10}  growth")
    for key, value in result["before"].items():
        after = result["after"][key]
        print(f"{key:<{width}}  {value:>10}  {after:>10}  {after - value:+d}")


def machine_info() -> dict[str, Any]:
    def line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""

    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "criu": line(["criu", "--version"]).removeprefix("Version: "),
            "runc": line([DEFAULT_RUNC, "--version"]).removeprefix("runc version "),
            "godwit_commit": line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
            "godwit_dirty": bool(line(["git", "-C", str(ROOT), "status", "--porcelain"])),
            "loadavg_before": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.round_trips < 1:
        parser.error("--round-trips must be at least 1")
    machine = machine_info()

    def progress(index: int, migrations: list[dict]) -> None:
        if index % 10 == 0 or index == args.round_trips:
            failed = sum(m["result"] != "ok" for m in migrations)
            print(f"round trip {index}/{args.round_trips}: {failed} failed", flush=True)

    result = run(args.round_trips, progress)
    print_table(result, args.round_trips)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "round_trips": args.round_trips,
                                    "strategies": STRATEGIES, "summary": summary(result),
                                    **result}, indent=1))
    print(f"\nwritten: {args.out}")
    facts = summary(result)
    return 1 if facts["failures"] or facts["client_errors"] or facts["growth"] else 0


if __name__ == "__main__":
    sys.exit(main())
