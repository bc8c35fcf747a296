"""A fleet on one machine: many netns hosts in cluster mode, several evacuated at once.

    .venv/bin/python bench/fleet.py [--hosts 20] [--containers 60] [--evacuate 5]
        [--per-host 2] [--per-cluster 5] [--out bench/results/fleet.json]

One etcd member (godwit.lab.etcd) on the testbed's bridge, `--hosts` netns hosts with agents
in cluster mode (godwit.lab.testbed), `--containers` counter containers (busybox sh, a few
hundred KiB) spread round-robin. `godwit evacuate h01 … --detach` writes one plan for the
first `--evacuate` hosts, with `--per-host` migrations at once out of one host and
`--per-cluster` in the whole plan (KubeVirt's parallelOutboundMigrationsPerNode and
parallelMigrationsPerCluster); the agents run it. Measured:

* wall time: the plan's creation to its `done` (written by the agent finishing last);
* per migration (medians): the migration's total (its report), the time in CRIU and
  transfer (phases dump, images, pages, restore, rootfs, rootfs-sync), the rest of the
  migration (prepare, arm, freeze, switch, verify, commit, cleanup, and the gaps), and the
  plan's overhead: an attempt's time as the plan sees it (task) minus the migration's total;
* etcd requests: every gRPC message etcd received during the evacuation (its own
  `grpc_server_msg_received_total`, so lease keepalives and the CLI count), and the agents'
  `godwit_etcd_requests_total`, per migration;
* memory: each agent's resident set (VmRSS) after the evacuation, and etcd's.

Every container must run exactly once at the end (else the benchmark fails). Prints a
table, writes JSON (raw tasks and reports, machine info) and the table as Markdown beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from common import ROOT, console, machine_info, markdown, run_main
from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from godwit.api import AgentClient
from godwit.cluster import plans
from godwit.cluster.store import Store
from godwit.lab.bundles import counter_bundle
from godwit.lab.cluster import cluster_testbed
from godwit.lab.etcd import EtcdCluster
from godwit.lab.testbed import Testbed
from godwit.protocol import to_json
from godwit.tls import client_context

DEFAULT_OUT = ROOT / "bench" / "results" / "fleet.json"
PREFIX = "gwf"
WORK_PHASES = ("dump", "images", "pages", "restore", "rootfs", "rootfs-sync")
PLAN_TIMEOUT_S = 900


class BenchError(Exception):
    """The fleet did not end with every container running exactly once."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--containers", type=int, default=60)
    parser.add_argument("--evacuate", type=int, default=5, help="hosts emptied at once")
    parser.add_argument("--per-host", type=int, default=2)
    parser.add_argument("--per-cluster", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not 0 < args.evacuate < args.hosts or args.containers < 1:
        parser.error("need 0 < --evacuate < --hosts and at least one container")
    return args


def host_names(count: int) -> list[str]:
    return [f"h{i:02d}" for i in range(1, count + 1)]


async def run_containers(bed: Testbed, count: int) -> dict[str, str]:
    """Container name → host, round-robin, 8 creations at once."""
    placement = {f"c{i:03d}": bed.names[i % len(bed.names)] for i in range(count)}
    gate = asyncio.Semaphore(8)
    context = client_context(bed.operator_tls)

    async def run(name: str, host: str) -> None:
        bundle = await asyncio.to_thread(counter_bundle, bed.bundle_dir(name))
        async with gate, AgentClient(bed.address(host), context, timeout=120) as agent:
            await agent.run(name, str(bundle))

    await asyncio.gather(*(run(n, h) for n, h in placement.items()))
    return placement


def etcd_messages(etcd: EtcdCluster) -> float:
    """gRPC messages etcd has received so far (every request, keepalive, watch create)."""
    member = etcd.members[0]
    url = f"https://{member.endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=10, context=client_context(etcd.client_tls)) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "grpc_server_msg_received" for s in f.samples)


def agents_etcd_requests(bed: Testbed) -> float:
    """The agents' godwit_etcd_requests_total, summed."""
    context = client_context(bed.operator_tls)
    total = 0.0
    for host in bed.names:
        url = f"https://{bed.address(host)}/metrics"
        with urllib.request.urlopen(url, timeout=30, context=context) as answer:
            text = answer.read().decode()
        total += sum(s.value for f in text_string_to_metric_families(text)
                     if f.name == "godwit_etcd_requests" for s in f.samples)
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def follow_plan(etcd: EtcdCluster, plan_id: str) -> tuple[plans.Plan, list[dict]]:
    async with Store(etcd.urls, etcd.client_tls) as store:
        deadline = time.monotonic() + PLAN_TIMEOUT_S
        while (plan := await plans.load(store, plan_id)).state != plans.DONE:
            if time.monotonic() > deadline:
                raise BenchError(f"plan {plan_id} not done in {PLAN_TIMEOUT_S} s")
            await asyncio.sleep(0.5)
        return plan, [e.value for e in await plans.tasks(store, plan_id)]


async def reports_of(bed: Testbed, hosts: list[str]) -> dict[str, dict]:
    context = client_context(bed.operator_tls)
    found: dict[str, dict] = {}
    for host in hosts:
        async with AgentClient(bed.address(host), context, timeout=30) as agent:
            found.update({r.id: to_json(r) for r in await agent.history()})
    return found


async def census(bed: Testbed) -> dict[str, list[str]]:
    """Container name → hosts where it runs."""
    context = client_context(bed.operator_tls)
    where: dict[str, list[str]] = {}
    for host in bed.names:
        async with AgentClient(bed.address(host), context, timeout=30) as agent:
            for row in await agent.containers():
                if row.status == "running":
                    where.setdefault(row.name, []).append(host)
    return where


def evacuate(bed: Testbed, hosts: list[str], per_host: int, per_cluster: int) -> str:
    result = bed.godwit("evacuate", *hosts, "--detach", "--json", "--parallel", str(per_host),
                        "--cluster-parallel", str(per_cluster), "--commit-timeout", "30")
    if result.returncode != 0:
        raise BenchError(f"godwit evacuate failed: {result.stderr.strip()}")
    return json.loads(result.stdout)["plan"]


def per_migration(tasks: list[dict], reports: dict[str, dict]) -> list[dict]:
    """One row per successful attempt: the report's figures and the plan's view of it."""
    rows = []
    for task in tasks:
        for attempt in task["attempts"]:
            report = reports.get(attempt.get("migration") or "")
            if attempt["result"] != "ok" or report is None:
                continue
            work = sum(p["seconds"] for p in report["phases"] if p["name"] in WORK_PHASES)
            rows.append({
                "container": task["container"], "source": task["source"],
                "destination": attempt["destination"], "total_s": report["total_s"],
                "downtime_s": report["downtime_s"], "criu_transfer_s": work,
                "other_migration_s": report["total_s"] - work,
                "plan_overhead_s": attempt["ended"] - attempt["started"] - report["total_s"],
                "phases": {p["name"]: p["seconds"] for p in report["phases"]},
                "report_bytes": len(json.dumps(report, separators=(",", ":"))),
            })
    return rows


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    info = machine_info()
    names = host_names(args.hosts)
    emptied = names[:args.evacuate]
    with cluster_testbed(names, PREFIX) as (bed, etcd):
        console.print(f"{args.hosts} agents in cluster mode "
                      f"({time.perf_counter() - started:.0f} s)")
        placement = asyncio.run(run_containers(bed, args.containers))
        rss_before = {h: rss_mib(bed.agents[h].pid) for h in names}
        etcd_before = etcd_messages(etcd)
        agents_before = agents_etcd_requests(bed)
        clock = time.perf_counter()
        plan_id = evacuate(bed, emptied, args.per_host, args.per_cluster)
        plan, tasks = asyncio.run(follow_plan(etcd, plan_id))
        wall = time.perf_counter() - clock
        etcd_delta = etcd_messages(etcd) - etcd_before
        agents_delta = agents_etcd_requests(bed) - agents_before
        rss_after = {h: rss_mib(bed.agents[h].pid) for h in names}
        etcd_rss = rss_mib(etcd.members[0].process.pid)
        reports = asyncio.run(reports_of(bed, emptied))
        where = asyncio.run(census(bed))
        etcd_keys = len(asyncio.run(_all_keys(etcd)))
    check_census(placement, where, emptied)
    rows = per_migration(tasks, reports)
    return {
        "benchmark": "fleet",
        "machine": info,
        "params": vars(args) | {"out": str(args.out)},
        "plan": plan.to_json(),
        "wall_s": wall,
        "migrations": len(rows),
        "results": dict(Counter(t["result"] for t in tasks)),
        "etcd_messages": etcd_delta,
        "agents_etcd_requests": agents_delta,
        "etcd_keys_after": etcd_keys,
        "agent_rss_mib_before": rss_before,
        "agent_rss_mib_after": rss_after,
        "etcd_rss_mib": etcd_rss,
        "loadavg_after": os.getloadavg(),
        "per_migration": rows,
        "tasks": tasks,
        "elapsed_s": time.perf_counter() - started,
    }


async def _all_keys(etcd: EtcdCluster) -> list:
    async with Store(etcd.urls, etcd.client_tls) as store:
        return await store.list("")


def check_census(placement: dict[str, str], where: dict[str, list[str]],
                 emptied: list[str]) -> None:
    wrong = {n: where.get(n, []) for n in placement if len(where.get(n, [])) != 1}
    if wrong:
        raise BenchError(f"containers not running exactly once: {wrong}")
    left = {n: h[0] for n, h in where.items() if h[0] in emptied}
    if left:
        raise BenchError(f"containers left on evacuated hosts: {left}")


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else float("nan")


def slowest_phases(rows: list[dict], count: int = 3) -> str:
    """The `count` phases outside CRIU and transfer with the largest medians."""
    names = {n for r in rows for n in r["phases"] if n not in WORK_PHASES}
    medians = {n: statistics.median(r["phases"].get(n, 0.0) for r in rows) for n in names}
    top = sorted(medians.items(), key=lambda item: item[1], reverse=True)[:count]
    return ", ".join(f"{n} {s:.2f} s" for n, s in top)


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows, n = result["per_migration"], max(result["migrations"], 1)
    p = result["params"]
    rss = list(result["agent_rss_mib_after"].values())
    header = ["measure", "value"]
    body = [
        ["fleet", f"{p['hosts']} hosts, {p['containers']} containers, "
                  f"{p['evacuate']} hosts evacuated at once"],
        ["limits", f"{p['per_host']} per host, {p['per_cluster']} per cluster"],
        ["migrations", f"{result['migrations']} ({result['results']})"],
        ["wall time", f"{result['wall_s']:.1f} s"],
        ["migration total (median)", f"{median(rows, 'total_s'):.2f} s"],
        ["  in CRIU and transfer", f"{median(rows, 'criu_transfer_s'):.2f} s"],
        ["  rest of the migration", f"{median(rows, 'other_migration_s'):.2f} s"],
        ["  its slowest other phases", slowest_phases(rows)],
        ["downtime (median)", f"{median(rows, 'downtime_s') * 1000:.0f} ms"],
        ["plan overhead per migration (median)",
         f"{median(rows, 'plan_overhead_s') * 1000:.0f} ms"],
        ["etcd requests received / migration", f"{result['etcd_messages'] / n:.1f} "
                                               f"({result['etcd_messages']:.0f} in all)"],
        ["agents' etcd requests / migration", f"{result['agents_etcd_requests'] / n:.1f}"],
        ["etcd keys after", str(result["etcd_keys_after"])],
        ["report in etcd (median)", f"{median(rows, 'report_bytes') / 1024:.1f} KiB"],
        ["agent RSS (median / max)", f"{statistics.median(rss):.0f} / {max(rss):.0f} MiB"],
        ["etcd RSS", f"{result['etcd_rss_mib']:.0f} MiB"],
        ["load average before → after", f"{result['machine']['loadavg_before'][0]:.1f} → "
                                         f"{result['loadavg_after'][0]:.1f}"],
        ["commit measured", f"{result['machine']['godwit_commit']}"
                            f"{' (dirty)' if result['machine']['godwit_dirty'] else ''}"],
    ]
    return header, body


def report(result: dict[str, Any], out: Path) -> None:
    header, body = table(result)
    shown = Table(title="fleet evacuation", header_style="bold", title_justify="left")
    for column in header:
        shown.add_column(column)
    for row in body:
        shown.add_row(*row)
    console.print(shown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(header, body) + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')} "
                  f"(benchmark {result['elapsed_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: bench(args), BenchError, lambda r: report(r, args.out))


if __name__ == "__main__":
    sys.exit(main())
