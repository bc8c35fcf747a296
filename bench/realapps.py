"""Real applications' freeze: Redis, nginx and PostgreSQL migrated under their load tools,
several times, with their downtime and the steps of their freeze.

    .venv/bin/python bench/realapps.py [--apps redis,nginx,postgres] [--repeat 3]
        [--ways stop-and-copy-rootfs,post-copy-rootfs] [--compare-with DIR]
        [--host-backed-memory] [--out bench/results/realapps.json]

Each repetition runs the real-application tests (`tests/realapps`, see the README) for
the chosen apps and ways of migrating, so every figure comes from a migration whose
client saw no error, no dropped connection and no lost data. The tests print one
`realapps:` line per migration (the report's downtime and phases); this collects them.

`--compare-with DIR` runs another checkout of godwit (`git worktree add DIR COMMIT`) in
the same run, its rounds alternating with this tree's, so a change is measured against
what it changed under the same machine load. `--host-backed-memory`: as in
`bench/migrate.py`.

Prints a table of medians and writes JSON (with the git commits and machine facts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import ROOT, command_line, console, machine_info, markdown, run_main
from guest_memory import host_backed_memory

DEFAULT_OUT = ROOT / "bench" / "results" / "realapps.json"
APPS = ("redis", "nginx", "postgres")
WAYS = ("stop-and-copy-rootfs", "stop-and-copy-shared", "post-copy-rootfs",
        "post-copy-shared")
FREEZE_PHASES = ("switch", "dump", "rootfs-sync", "images", "restore")
LINE = "realapps: "


class RunFailed(Exception):
    """A real-application test failed: its figures would not be a clean migration's."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", default=",".join(APPS), type=_choices(APPS))
    parser.add_argument("--ways", default=",".join(WAYS), type=_choices(WAYS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare-with", type=Path, metavar="DIR",
                        help="another godwit checkout, run in alternation with this one")
    parser.add_argument("--host-backed-memory", action="store_true",
                        help="on a VM with free page reporting: stop it for the run and "
                             "touch the free memory first (bench/guest_memory.py)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.compare_with and not (args.compare_with / "tests" / "realapps").is_dir():
        parser.error(f"{args.compare_with} is not a godwit checkout with tests/realapps")
    return args


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of items of `allowed`."""
    def parse(text: str) -> list[str]:
        chosen = [item.strip() for item in text.split(",") if item.strip()]
        if unknown := [item for item in chosen if item not in allowed]:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {allowed}")
        return chosen
    return parse


def run_tests(tree: Path, apps: list[str], ways: list[str]) -> list[dict[str, Any]]:
    """One pass of the real-application tests of the checkout `tree` (its own godwit, in
    the agents too); the figures of each migration."""
    files = [f"tests/realapps/test_{app}.py" for app in apps]
    command = [sys.executable, "-m", "pytest", "-m", "realapps", "-s", "-q",
               "-p", "no:cacheprovider", "-k", " or ".join(ways), *files]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-15:])
        raise RunFailed(f"the real-application tests of {tree} failed:\n{tail}")
    return [json.loads(line.removeprefix(LINE)) for line in done.stdout.splitlines()
            if line.startswith(LINE)]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()
    trees = [ROOT, *([args.compare_with.resolve()] if args.compare_with else [])]
    runs: dict[Path, list[dict[str, Any]]] = {tree: [] for tree in trees}
    memory = host_backed_memory() if args.host_backed_memory else contextlib.nullcontext(
        {"free_page_reporting": "left as is"})
    with memory as machine["guest_memory"]:
        for round_ in range(args.repeat):
            for tree in trees:
                console.print(f"round {round_ + 1}/{args.repeat}: {tree}")
                runs[tree] += run_tests(tree, args.apps, args.ways)
    return {"benchmark": "realapps", "machine": machine,
            "params": {"apps": args.apps, "ways": args.ways, "repeat": args.repeat},
            "trees": [{"path": str(tree), "commit": _commit(tree), "runs": runs[tree],
                       "medians": medians(runs[tree])} for tree in trees]}


def _commit(tree: Path) -> str:
    return command_line(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"])


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per app and way: median downtime and total, and the median of each freeze step."""
    groups: dict[tuple[str, str, bool], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["app"], run["strategy"], run["shared"])].append(run)
    rows = []
    for (app, strategy, shared), group in sorted(groups.items()):
        phases = {name: statistics.median(run["phases"].get(name, 0.0) for run in group)
                  for name in FREEZE_PHASES}
        rows.append({"app": app, "strategy": strategy, "shared": shared, "runs": len(group),
                     "downtime_s": statistics.median(run["downtime_s"] for run in group),
                     "downtime_range_s": [min(run["downtime_s"] for run in group),
                                          max(run["downtime_s"] for run in group)],
                     "total_s": statistics.median(run["total_s"] for run in group),
                     "rss_mib": statistics.median(run["rss_mib"] for run in group),
                     "freeze_phases_s": phases})
    return rows


def report(result: dict[str, Any], out: Path) -> None:
    header = ["commit", "app", "strategy", "rootfs", "runs", "downtime ms (min-max)",
              "total ms", *[f"{name} ms" for name in FREEZE_PHASES]]
    rows = [[tree["commit"], row["app"], row["strategy"],
             "shared" if row["shared"] else "transferred", str(row["runs"]),
             f"{_ms(row['downtime_s'])} ({_ms(row['downtime_range_s'][0])}-"
             f"{_ms(row['downtime_range_s'][1])})", _ms(row["total_s"]),
             *[_ms(row["freeze_phases_s"][name]) for name in FREEZE_PHASES]]
            for tree in result["trees"] for row in tree["medians"]]
    table = markdown(header, rows)
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    console.print(f"written: {out} and {out.with_suffix('.md')}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main() -> int:
    args = parse_args()
    return run_main(lambda: bench(args), RunFailed, lambda result: report(result, args.out))


if __name__ == "__main__":
    sys.exit(main())
