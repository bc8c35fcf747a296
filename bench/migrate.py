"""Downtime and total time of a live migration: godwit versus the manual runc/CRIU recipe.

    .venv/bin/python bench/migrate.py [--sizes 64,256,1024] [--repeat 3]
        [--out bench/results/migrate.json] [--strategies stop-and-copy]
        [--peers manual,podman] [--host-backed-memory]

Two netns hosts a and b with agents (godwit.lab.testbed) on this machine. For every size N a
fresh memhog container touches N MiB of incompressible memory (no dirtying), is migrated
a → b, then verified: SIGUSR1 makes memhog recompute the checksum of its whole buffer,
which must equal the one from before the migration (a mismatch aborts the benchmark).
Methods, interleaved per repetition so that noise spreads evenly:

* godwit STRATEGY: ``godwit migrate NAME --to b --strategy STRATEGY --json``, the default
  transfer mode (rootfs streamed by the agents, once running and a diff while frozen);
  downtime, total, image bytes and phases come from godwit's own report. Downtime runs
  from the end of ``runc pause`` to the destination's answer to the restore request.
* godwit STRATEGY --shared-storage: the same, rootfs not copied (like the manual recipe).
* manual: what an operator does by hand: ``runc checkpoint`` on a (stops the container),
  ``cp -a`` of the image dir into a dir of b, ``runc restore -d`` on b with a config.json
  holding b's own cgroupsPath and the same rootfs (shared storage). runc runs inside the
  host's netns, like the agents. Downtime = total = start of ``runc checkpoint`` to
  ``runc restore`` returning (no phase runs before the freeze).
* podman: Podman's own checkpoint archive (`bench/podman_peer.py`): ``podman container
  checkpoint --export`` on the same memhog image with runc and the same CRIU, the archive
  copied (a local ``cp``, or a plain TCP stream over the testbed link from a's netns to
  b's), then ``podman container restore --import``. Downtime = total = checkpoint to
  restore returning.

On a VM whose balloon reports free memory to its host, `--host-backed-memory` stops that
for the run and touches the free memory first (bench/guest_memory.py): otherwise every
method's allocations pay the host's first-touch faults at random (149 MB/s measured).
Both hosts share one kernel, one disk and two vCPUs: the manual "copy" is a local ``cp``
(in-kernel copy_file_range) and godwit's transfer is the agents' HTTPS (the testbed's mutual
TLS, sha256 per file) over a veth bridge, so neither includes a real network.
The link from a to b is measured before and after the migrations (`bench/link_speed.py`,
a TLS stream with the agents' certificates): stop-and-copy's total is tabled against 1.5 x
memory / TLS link, the link being that stream or the run's fastest stop-and-copy dump,
whichever carried more (issue 17).
Prints a table (medians) and writes every raw run, the medians and machine info as JSON,
plus the tables as Markdown next to it (same name, .md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import link_speed
import podman_peer
from common import ROOT, console, machine_info, markdown, remove_cgroup, run_main
from guest_memory import host_backed_memory
from migrate_plot import curve_png
from rich.table import Table

from godwit.bundle import load_config, rewrite_for_host, save_config
from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import memhog_bundle, read_state
from godwit.runc import DEFAULT_RUNC

DEFAULT_OUT = ROOT / "bench" / "results" / "migrate.json"
# Netns, cgroup and container names; a second benchmark running beside (another worktree)
# needs its own: GODWIT_BENCH_PREFIX (at most 9 characters: interface names).
PREFIX = os.environ.get("GODWIT_BENCH_PREFIX", "gwbench")[:9]
MiB = 1 << 20
READY_TIMEOUT_S = 120  # memhog filling and checksumming its buffer
VERIFY_TIMEOUT_S = 120
MIGRATE_TIMEOUT_S = 300
RUNC_TIMEOUT_S = 180
LINK_MIB, LINK_STREAMS = 1024, 3  # the link is measured before and after the migrations
TOTAL_OVER_LINK = 1.5  # issue 17: stop-and-copy's total within 1.5 x memory / TLS link

class BenchError(RuntimeError):
    """A run failed or lost memory: the benchmark stops."""


@dataclass(frozen=True)
class Method:
    """One column group of the table."""

    key: str
    label: str
    kind: str  # "godwit" | "manual" | "podman"
    strategy: str | None = None
    shared: bool = False
    over_link: bool = False  # podman: the archive crosses the testbed link


# ------------------------------------------------------------------------ helpers


def wait_status(rootfs: Path, status: str, timeout: float) -> dict[str, Any]:
    """memhog's state once it reads ``status``."""
    deadline = time.monotonic() + timeout
    while (state := read_state(rootfs)).get("status") != status:
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for memhog {status}"
                             f" in {rootfs}")
        time.sleep(0.02)
    return state


def check_memory(before: dict[str, Any], after: dict[str, Any], where: str) -> None:
    """The restored buffer must hash to what it did before, and the process went on."""
    same = after.get("checksum") == after.get("expected") == before.get("checksum")
    if after.get("ok") != 1 or not same:
        raise BenchError(f"MEMORY LOST ({where}): before {before} / after {after}")
    if after.get("counter", 0) <= before.get("counter", 0):
        raise BenchError(f"memhog restarted instead of resuming ({where}): {after}")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------ godwit


def godwit(bed: Testbed, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    result = bed.godwit(*args, timeout=timeout)
    if result.returncode != 0:
        raise BenchError(f"godwit {' '.join(args)} failed: {result.stderr.strip()[-800:]}")
    return result


def godwit_rootfs(bed: Testbed, name: str) -> Path:
    rows = json.loads(godwit(bed, "ps", "--json").stdout)["containers"]
    return Path(next(r["rootfs"] for r in rows if r["name"] == name))


def godwit_migrate(bed: Testbed, method: Method, name: str) -> tuple[dict[str, Any], float]:
    """Migrate a → b; returns godwit's report and the CLI's wall time."""
    args = ["migrate", name, "--to", "b", "--json", "--strategy", str(method.strategy)]
    args += ["--shared-storage"] if method.shared else []
    started = time.perf_counter()
    result = bed.godwit(*args, timeout=MIGRATE_TIMEOUT_S)
    wall = time.perf_counter() - started
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise BenchError(f"godwit migrate gave no report: {result.stderr.strip()}") from None
    if result.returncode != 0 or report.get("result") != "ok":
        raise BenchError(f"godwit migrate failed: {report.get('error')} ({report.get('outcome')})")
    return report, wall


def run_godwit(bed: Testbed, method: Method, mib: int, name: str) -> dict[str, Any]:
    """One godwit migration of a fresh memhog container, verified, then removed."""
    bundle = memhog_bundle(bed.bundle_dir(name), mib, dirty_pps=0)
    try:
        godwit(bed, "run", name, "--bundle", str(bundle), "--host", "a")
        wait_status(bundle / "rootfs", "ready", READY_TIMEOUT_S)
        before = read_state(bundle / "rootfs")
        report, wall = godwit_migrate(bed, method, name)
        godwit(bed, "kill", name, "--signal", "USR1")
        after = wait_status(godwit_rootfs(bed, name), "verified", VERIFY_TIMEOUT_S)
        check_memory(before, after, f"{method.label}, {mib} MiB")
    finally:
        bed.godwit("rm", name)
        shutil.rmtree(bundle, ignore_errors=True)
        for host in ("a", "b"):
            remove_cgroup(f"/godwit/{host}/{name}")
    return godwit_result(report, wall)


def godwit_result(report: dict[str, Any], wall: float) -> dict[str, Any]:
    return {
        "downtime_s": report["downtime_s"],
        "total_s": report["total_s"],
        "image_bytes": report["image_bytes"],
        "rootfs_bytes": report["rootfs_bytes"],
        "wire_bytes": report["wire_bytes"],
        "phases": {p["name"]: p["seconds"] for p in report["phases"]},
        "cli_wall_s": wall,
        "report": report,
    }


# ------------------------------------------------------------------------ manual recipe


def runc(bed: Testbed, host: str, args: list[str], log: Path) -> None:
    """``runc --root <host's root> ARGS`` in the host's netns; stdio /dev/null (a pipe
    would hang ``run/restore -d``), errors from the JSON log file."""
    argv = [DEFAULT_RUNC, "--root", str(bed.host(host).runc_root), "--log", str(log),
            "--log-format", "json", *args]
    dev = subprocess.DEVNULL
    proc = bed.net.run_in(host, argv, stdin=dev, stdout=dev, stderr=dev)
    try:
        code = proc.wait(RUNC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchError(f"runc {args[0]} on {host} took over {RUNC_TIMEOUT_S} s") from None
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise BenchError(f"runc {args[0]} on {host} failed: {' | '.join(tail)}")


def host_dir(bed: Testbed, host: str, name: str) -> Path:
    path = bed.host(host).state_dir / "manual" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def host_bundle(bed: Testbed, host: str, name: str, config: dict, rootfs: Path) -> Path:
    """A bundle dir on ``host``: config.json with its own cgroupsPath, the shared rootfs."""
    bundle = host_dir(bed, host, name) / "bundle"
    bundle.mkdir(exist_ok=True)
    cgroup = f"/{PREFIX}/{host}/{name}"
    save_config(bundle, rewrite_for_host(config, rootfs=rootfs, cgroups_path=cgroup))
    return bundle


def manual_migrate(bed: Testbed, name: str) -> dict[str, float]:
    """checkpoint on a → cp -a to b → restore on b; seconds of each step."""
    src, dst = host_dir(bed, "a", name), host_dir(bed, "b", name)
    t0 = time.perf_counter()
    runc(bed, "a", ["checkpoint", "--image-path", str(src / "images"), "--work-path",
                    str(src / "work"), name], src / "runc.log")
    t1 = time.perf_counter()
    subprocess.run(["cp", "-a", str(src / "images"), str(dst / "images")], check=True,
                   timeout=RUNC_TIMEOUT_S)
    t2 = time.perf_counter()
    runc(bed, "b", ["restore", "--detach", "--bundle", str(dst / "bundle"), "--image-path",
                    str(dst / "images"), "--work-path", str(dst / "work"), name],
         dst / "runc.log")
    t3 = time.perf_counter()
    return {"checkpoint": t1 - t0, "copy": t2 - t1, "restore": t3 - t2}


def run_manual(bed: Testbed, mib: int, name: str) -> dict[str, Any]:
    """One hand-made migration of a fresh memhog container, verified, then removed."""
    bundle = memhog_bundle(bed.bundle_dir(name), mib, dirty_pps=0)
    rootfs = (bundle / "rootfs").resolve()
    config = load_config(bundle)
    try:
        bundle_a = host_bundle(bed, "a", name, config, rootfs)
        host_bundle(bed, "b", name, config, rootfs)
        log = host_dir(bed, "a", name) / "runc.log"
        runc(bed, "a", ["run", "--detach", "--bundle", str(bundle_a), name], log)
        wait_status(rootfs, "ready", READY_TIMEOUT_S)
        before = read_state(rootfs)
        steps = manual_migrate(bed, name)
        image_bytes = tree_bytes(host_dir(bed, "b", name) / "images")
        runc(bed, "b", ["kill", name, "USR1"], host_dir(bed, "b", name) / "runc.log")
        after = wait_status(rootfs, "verified", VERIFY_TIMEOUT_S)
        check_memory(before, after, f"manual, {mib} MiB")
    finally:
        cleanup_manual(bed, name, bundle)
    total = sum(steps.values())
    return {"downtime_s": total, "total_s": total, "image_bytes": image_bytes,
            "rootfs_bytes": 0, "wire_bytes": image_bytes, "phases": steps}


def cleanup_manual(bed: Testbed, name: str, bundle: Path) -> None:
    for host in ("a", "b"):
        log = bed.host(host).state_dir / "manual" / f"{name}-delete.log"
        with contextlib.suppress(BenchError):
            runc(bed, host, ["delete", "--force", name], log)
        shutil.rmtree(bed.host(host).state_dir / "manual", ignore_errors=True)
        remove_cgroup(f"/{PREFIX}/{host}/{name}", parents=True)
    shutil.rmtree(bundle, ignore_errors=True)


# ------------------------------------------------------------------------ podman


def run_podman(bed: Testbed, method: Method, mib: int, name: str) -> dict[str, Any]:
    """One Podman export/copy/import of a fresh memhog container, verified, then removed."""
    try:
        rootfs = podman_peer.start(podman_peer.memhog_image(), name, mib)
        wait_status(rootfs, "ready", READY_TIMEOUT_S)
        before = read_state(rootfs)
        restored, steps = podman_peer.migrate(bed, name, method.over_link)
        podman_peer.podman("kill", "--signal", "USR1", restored)
        after = wait_status(podman_peer.merged_dir(restored), "verified", VERIFY_TIMEOUT_S)
        check_memory(before, after, f"{method.label}, {mib} MiB")
        return podman_peer.result(steps, podman_peer.archive_bytes(bed, name))
    except podman_peer.PodmanError as exc:
        raise BenchError(str(exc)) from None
    finally:
        podman_peer.remove(bed, name)


# ------------------------------------------------------------------------ the benchmark

PEERS = {
    "manual": [Method("manual", "manual runc+cp", "manual")],
    "podman": [Method("podman", "podman export/import (local cp)", "podman"),
               Method("podman-link", "podman export/import (copy over link)", "podman",
                      over_link=True)],
}


def methods_for(strategies: list[str], peers: list[str] = ("manual",)) -> list[Method]:
    methods = []
    for s in strategies:
        methods.append(Method(f"godwit-{s}", f"godwit {s}", "godwit", s))
        methods.append(Method(f"godwit-{s}-shared", f"godwit {s} shared-storage",
                              "godwit", s, shared=True))
    return methods + [m for peer in peers for m in PEERS[peer]]


RUNNERS = {"godwit": run_godwit, "podman": run_podman,
           "manual": lambda bed, _method, mib, name: run_manual(bed, mib, name)}


def run_one(bed: Testbed, method: Method, index: int, mib: int, rep: int) -> dict[str, Any]:
    name = f"{PREFIX}-{index}-{mib}-{rep}"
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = RUNNERS[method.kind](bed, method, mib, name)
    run = {"method": method.key, "mib": mib, "repeat": rep, **result,
           "run_wall_s": time.perf_counter() - started, "loadavg_1min_before": load}
    console.print(f"  {mib:>5} MiB #{rep + 1} {method.label:<40} downtime "
                  f"{run['downtime_s'] * 1000:7.0f} ms   total {run['total_s'] * 1000:7.0f} ms"
                  f"   ({run['run_wall_s']:.1f} s)")
    return run


def run_all(bed: Testbed, methods: list[Method], sizes: list[int],
            repeat: int) -> list[dict[str, Any]]:
    """Sizes in order; within a size, methods interleaved per repetition."""
    runs = []
    for mib in sizes:
        for rep in range(repeat):
            for index, method in enumerate(methods):
                runs.append(run_one(bed, method, index, mib, rep))
    return runs


def summarize(runs: list[dict[str, Any]], methods: list[Method],
              sizes: list[int]) -> dict[str, Any]:
    """Medians per size and method (phases too)."""
    summary: dict[str, Any] = {}
    for mib in sizes:
        summary[str(mib)] = {}
        for m in methods:
            mine = [r for r in runs if r["mib"] == mib and r["method"] == m.key]
            phases = list(dict.fromkeys(p for r in mine for p in r["phases"]))
            summary[str(mib)][m.key] = {
                "runs": len(mine),
                "downtime_ms": median([r["downtime_s"] * 1000 for r in mine]),
                "total_ms": median([r["total_s"] * 1000 for r in mine]),
                "image_mib": median([r["image_bytes"] / MiB for r in mine]),
                "rootfs_mib": median([r["rootfs_bytes"] / MiB for r in mine]),
                "phases_ms": {p: median([r["phases"].get(p, 0) * 1000 for r in mine])
                              for p in phases},
            }
    return summary


# ------------------------------------------------------------------------ output


def table_rows(summary: dict[str, Any], methods: list[Method]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: size, per method downtime/total, image MiB."""
    header = ["size"]
    for m in methods:
        header += [f"{m.label} downtime ms", f"{m.label} total ms"]
    header.append("image MiB")
    rows = []
    for mib, by_method in summary.items():
        row = [f"{mib} MiB"]
        for m in methods:
            row += [f"{by_method[m.key]['downtime_ms']:.0f}", f"{by_method[m.key]['total_ms']:.0f}"]
        row.append(f"{by_method[methods[0].key]['image_mib']:.1f}")
        rows.append(row)
    return header, rows


def phase_rows(summary: dict[str, Any], methods: list[Method]) -> tuple[list[str], list[list[str]]]:
    """Where the time goes: median ms of every phase, one row per size and method."""
    header = ["size", "method", "phases (median ms)"]
    rows = []
    for mib, by_method in summary.items():
        for m in methods:
            phases = by_method[m.key]["phases_ms"]
            text = ", ".join(f"{name} {ms:.0f}" for name, ms in phases.items())
            rows.append([f"{mib} MiB", m.label, text])
    return header, rows


def ratio_rows(summary: dict[str, Any],
               methods: list[Method]) -> tuple[list[str], list[list[str]]]:
    """Each godwit method's median downtime over the manual recipe's, per size (issue 17's
    target: stop-and-copy at most 0.8 times)."""
    godwit = [m for m in methods if m.kind == "godwit"]
    header = ["size", *(f"{m.label} / manual downtime" for m in godwit)]
    rows = []
    for mib, by_method in summary.items():
        manual = by_method.get("manual", {}).get("downtime_ms")
        rows.append([f"{mib} MiB", *(f"{by_method[m.key]['downtime_ms'] / manual:.2f}"
                                     if manual else "-" for m in godwit)])
    return header, rows


def link_rate(result: dict[str, Any]) -> tuple[float, str]:
    """The TLS link's MiB/s in this run, and where it comes from: the faster of a TLS
    stream across it (`bench/link_speed.py`) and the fastest stop-and-copy dump's pages
    (CRIU's TLS page stream, median per size and method), so that the bound is not made
    lax by a slow measuring tool."""
    stream = result["link"]["median_mib_per_s"][link_speed.TLS]
    fastest_dump = max((median["image_mib"] / (median["phases_ms"]["dump"] / 1000)
                        for by_method in result["summary"].values()
                        for key, median in by_method.items()
                        if key.startswith("godwit-stop-and-copy")
                        and median["phases_ms"].get("dump")), default=0.0)
    if fastest_dump > stream:
        return fastest_dump, "stop-and-copy dump's pages"
    return stream, "TLS stream (bench/link_speed.py)"


def link_rows(summary: dict[str, Any], methods: list[Method],
              rate: float) -> tuple[list[str], list[list[str]]]:
    """Stop-and-copy's median total against TOTAL_OVER_LINK x memory / `rate` (the TLS
    link's MiB/s), per size (issue 17's target: at most 1)."""
    stop_and_copy = [m for m in methods if m.strategy == "stop-and-copy"]
    header = ["size", "bound ms", *(f"{m.label} total / bound" for m in stop_and_copy)]
    rows = []
    for mib, by_method in summary.items():
        bound = TOTAL_OVER_LINK * int(mib) / rate * 1000
        rows.append([f"{mib} MiB", f"{bound:.0f}",
                     *(f"{by_method[m.key]['total_ms'] / bound:.2f}" for m in stop_and_copy)])
    return header, rows


def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, header_style="bold", title_justify="left")
    for i, column in enumerate(header):
        table.add_column(column, justify="right" if i and "phases" not in column else "left")
    for row in rows:
        table.add_row(*row)
    return table


def report(result: dict[str, Any], methods: list[Method], out: Path) -> None:
    """Print both tables; write JSON and Markdown."""
    main = table_rows(result["summary"], methods)
    ratios = ratio_rows(result["summary"], methods)
    phases = phase_rows(result["summary"], methods)
    rate, source = link_rate(result)
    link = link_rows(result["summary"], methods, rate)
    link_title = (f"stop-and-copy total against {TOTAL_OVER_LINK:g} x memory / TLS link "
                  f"({rate:,.0f} MiB/s, {source})")
    console.print(rich_table("migration of a memhog container a → b (medians)", *main))
    console.print(rich_table("downtime against the manual recipe", *ratios))
    console.print(rich_table(link_title, *link))
    console.print(rich_table("where the time goes", *phases))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        "\n\n".join(markdown(*table) for table in (main, ratios, link, phases))
        + f"\n\n{link_title}; link streams in MiB/s: {json.dumps(result['link'])}\n")
    curve_png(result, out.with_suffix(".png"))
    console.print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256,1024,2048", help="MiB of touched memory")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--strategies", default="stop-and-copy,post-copy",
                        help="comma-separated, passed to godwit migrate --strategy")
    parser.add_argument("--peers", default="manual,podman",
                        help=f"comma-separated, from {','.join(PEERS)} (or none)")
    parser.add_argument("--host-backed-memory", action="store_true",
                        help="on a VM with free page reporting: stop it for the run and "
                             "touch the free memory first (bench/guest_memory.py)")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip() not in ("", "none")]
    if not args.sizes or min(args.sizes) <= 0 or args.repeat < 1:
        parser.error("sizes must be positive MiB and --repeat at least 1")
    if unknown := set(args.peers) - set(PEERS):
        parser.error(f"unknown peer {', '.join(sorted(unknown))}")
    if "podman" in args.peers and not podman_peer.available():
        parser.error("podman is not installed (scripts/setup installs it)")
    return args


def measure_link(bed: Testbed) -> dict[str, Any]:
    try:
        return link_speed.measure(bed, LINK_MIB, LINK_STREAMS)
    except link_speed.LinkError as exc:
        raise BenchError(str(exc)) from None


def bench(args: argparse.Namespace) -> tuple[dict[str, Any], list[Method]]:
    methods = methods_for(args.strategies, args.peers)
    started = time.perf_counter()
    info = machine_info()
    if info["busy_processes_before"]:
        console.print("[yellow]warning: other processes are using CPU, figures will be "
                      f"noisy: {info['busy_processes_before']}[/yellow]")
    memory = host_backed_memory() if args.host_backed_memory else contextlib.nullcontext(
        {"free_page_reporting": "left as is"})
    with memory as info["guest_memory"], \
            Testbed(["a", "b"], prefix=PREFIX, subnet=pick_free_subnet()) as bed:
        info["godwit_tls"] = json.loads(bed.config_path.read_text()).get("tls") is not None
        before = measure_link(bed)
        runs = run_all(bed, methods, args.sizes, args.repeat)
        link = link_speed.combine(before, measure_link(bed))
    return {
        "benchmark": "migrate",
        "machine": info,
        "params": {"sizes_mib": args.sizes, "repeat": args.repeat,
                   "strategies": args.strategies, "peers": args.peers,
                   "workload": "memhog dirty_pps=0"},
        "methods": [asdict(m) for m in methods],
        "summary": summarize(runs, methods, args.sizes),
        "link": link,
        "runs": runs,
        "elapsed_s": time.perf_counter() - started,
    }, methods


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def show(outcome: tuple[dict[str, Any], list[Method]]) -> None:
        report(outcome[0], outcome[1], args.out)
        console.print(f"total benchmark time {outcome[0]['elapsed_s']:.0f} s")

    return run_main(lambda: bench(args), BenchError, show)


if __name__ == "__main__":
    sys.exit(main())
