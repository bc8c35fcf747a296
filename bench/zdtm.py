"""CRIU's zdtm static tests through a godwit migration a → b.

    .venv/bin/python bench/zdtm.py [--variants stop-and-copy,post-copy,stop-and-copy+shared]
        [--tests REGEX] [--jobs 1] [--as-root] [--out bench/results/zdtm.json]

Builds the zdtm static tests from the CRIU source tarball scripts/setup fetched (cached in
``$GODWIT_CACHE/zdtm-<version>``, bench/zdtm_suite.py), selects the static tests of the
``ns`` flavour that need no CRIU option, no zdtm.py hook and only CRIU features this host
has. Every selected test first runs in a fresh godwit container on host a with no migration
(control run: start, SIGTERM, PASS?); a test that passes it then runs once per variant in a
fresh container: started, migrated a → b with ``godwit migrate --strategy S
[--shared-storage]``, then stopped and checked the same way (bench/zdtm_harness.py).
Tests run as zdtm.py runs them: as uid 18943 unless their .desc has the ``suid`` flag;
``--as-root`` keeps every test root. A ``nolazy`` test is skipped for post-copy, as zdtm.py
skips it with lazy pages.

Prints a table per variant (passed / failed / hang / control-failed, pass rate over the
control-passing tests) and every failure with its reason; writes JSON (every run, the
godwit commit measured, machine info) and the tables as Markdown next to it. The CRIU and
runc logs of every failed run are kept under --logs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import console, machine_info, markdown, run_main
from rich.table import Table
from zdtm_harness import RunResult, Variant, run_test
from zdtm_suite import ZdtmError, ZdtmTest, build, select

from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed
from godwit.migration.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "zdtm.json"
DEFAULT_LOGS = Path("/var/tmp/godwit-zdtm-logs")
DEFAULT_VARIANTS = "stop-and-copy,post-copy,stop-and-copy+shared"
PREFIX = f"gwzdtm{os.getpid() % 10000}"  # runs side by side never share hosts



def parse_variant(text: str) -> Variant:
    """'post-copy' or 'stop-and-copy+shared' (with --shared-storage)."""
    strategy, _, extra = text.partition("+")
    if strategy not in STRATEGIES or strategy == "auto" or extra not in ("", "shared"):
        raise ValueError(f"unknown variant {text!r} (STRATEGY or STRATEGY+shared)")
    return Variant(strategy, extra == "shared")


# ------------------------------------------------------------------------ running


class Bench:
    """Runs tests on one testbed; records every run."""

    def __init__(self, bed: Testbed, test_dir: Path, variants: list[Variant],
                 args: argparse.Namespace, partial: dict[str, Any]) -> None:
        self.bed, self.test_dir, self.variants, self.args = bed, test_dir, variants, args
        self.runs: list[RunResult] = []
        self.numbers = itertools.count(1)
        self.partial = partial  # the result so far, written after every test
        self.lock = threading.Lock()

    def name(self) -> str:
        return f"zd{next(self.numbers)}"

    def one(self, test: ZdtmTest, variant: Variant) -> RunResult:
        result = run_test(self.bed, test, self.test_dir, variant, name=self.name(),
                          logs_dir=self.args.logs, as_root=self.args.as_root)
        self.runs.append(result)
        show(result, variant)
        return result

    def test(self, test: ZdtmTest) -> None:
        """Control run, then every variant if the control passed; save what is known."""
        if self.one(test, Variant()).verdict == "pass":
            self.variants_of(test)
        with self.lock:
            done = {r.test for r in self.runs}
            tests = [t for t in self.partial["tests"] if t.name in done]
            self.partial["summary"] = summarize(self.runs, tests, self.variants)
            self.partial["runs"] = [r.to_json() for r in self.runs]
            write({k: v for k, v in self.partial.items() if k != "tests"}, self.args.out)

    def variants_of(self, test: ZdtmTest) -> None:
        for variant in self.variants:
            if variant.strategy == "post-copy" and "nolazy" in test.flags:
                self.runs.append(RunResult(test.name, variant.strategy, variant.shared_storage,
                                           verdict="skip", reason="nolazy"))
                continue
            self.one(test, variant)


def show(result: RunResult, variant: Variant) -> None:
    colour = {"pass": "green", "fail": "red", "hang": "magenta"}.get(result.verdict, "yellow")
    downtime = (result.migration or {}).get("downtime_s")
    extra = f" downtime {downtime * 1000:.0f} ms" if downtime else ""
    why = f"  {result.step}: {result.reason}" if result.verdict != "pass" else ""
    console.print(f"  {result.test:<28} {variant.label:<30} [{colour}]{result.verdict}[/{colour}]"
                  f"{extra} ({result.seconds:.1f} s){why[:160]}", highlight=False)


def run_all(bed: Testbed, test_dir: Path, tests: list[ZdtmTest], variants: list[Variant],
            args: argparse.Namespace, partial: dict[str, Any]) -> list[RunResult]:
    bench = Bench(bed, test_dir, variants, args, {**partial, "tests": tests})
    if args.jobs == 1:
        for test in tests:
            bench.test(test)
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(bench.test, tests))
    return bench.runs


# ------------------------------------------------------------------------ summary


def summarize(runs: list[RunResult], tests: list[ZdtmTest],
              variants: list[Variant]) -> dict[str, Any]:
    control = {r.test: r for r in runs if r.strategy is None}
    control_failed = sorted(t for t, r in control.items() if r.verdict != "pass")
    summary: dict[str, Any] = {"selected": len(tests), "control_passed":
                               len(control) - len(control_failed),
                               "control_failed": control_failed, "variants": {}}
    for v in variants:
        mine = [r for r in runs if r.strategy == v.strategy
                and r.shared_storage == v.shared_storage]
        counts = {k: sum(r.verdict == k for r in mine) for k in ("pass", "fail", "hang", "skip")}
        ran = counts["pass"] + counts["fail"] + counts["hang"]
        summary["variants"][v.label] = {
            **counts, "control_failed": len(control_failed), "ran": ran,
            "pass_rate": counts["pass"] / ran if ran else None,
            "failures": {r.test: f"{r.verdict} at {r.step}: {r.reason}" for r in mine
                         if r.verdict in ("fail", "hang")},
        }
    return summary


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "passed", "failed", "hang", "skipped", "control-failed", "pass rate"]
    rows = []
    for label, s in summary["variants"].items():
        rate = f"{s['pass_rate'] * 100:.1f} % of {s['ran']}" if s["ran"] else "-"
        rows.append([label, str(s["pass"]), str(s["fail"]), str(s["hang"]), str(s["skip"]),
                     str(s["control_failed"]), rate])
    return header, rows


def failure_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [[label, test, why] for label, s in summary["variants"].items()
            for test, why in s["failures"].items()]
    return ["variant", "test", "reason"], rows


def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, header_style="bold", title_justify="left")
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def report(result: dict[str, Any], out: Path) -> None:
    main, failures = table_rows(result["summary"]), failure_rows(result["summary"])
    s = result["summary"]
    console.print(f"{s['selected']} tests selected, {s['control_passed']} pass their control "
                  f"run; control failures: {', '.join(s['control_failed']) or 'none'}")
    console.print(rich_table("zdtm static tests through a migration a → b", *main))
    if failures[1]:
        console.print(rich_table("failures", *failures))
    write(result, out)
    out.with_suffix(".md").write_text(markdown(*main) + "\n\n" + markdown(*failures) + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated STRATEGY or STRATEGY+shared (--shared-storage)")
    parser.add_argument("--tests", help="regular expression on test names")
    parser.add_argument("--every", type=int, default=1,
                        help="run every Nth selected test only (a spread-out sample)")
    parser.add_argument("--jobs", type=int, default=1, help="tests run at once")
    parser.add_argument("--as-root", action="store_true",
                        help="run every test as root (zdtm.py: uid 18943 unless suid)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--logs", type=Path, help=f"default {DEFAULT_LOGS}/<date>")
    args = parser.parse_args(argv)
    try:
        args.variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
        if args.tests:
            re.compile(args.tests)
    except (ValueError, re.error) as exc:
        parser.error(str(exc))
    if args.jobs < 1 or args.every < 1:
        parser.error("--jobs and --every must be at least 1")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.logs = args.logs or DEFAULT_LOGS / stamp
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    info = machine_info()
    test_dir = build()
    selection = select(test_dir, "ns", args.tests)
    console.print(f"zdtm in {test_dir}: {len(selection.tests)} static tests selected "
                  f"(ns flavour), {len(selection.skipped)} left out")
    if not selection.tests:
        raise ZdtmError("no test matches")
    selection.tests = selection.tests[::args.every]
    result = {
        "benchmark": "zdtm",
        "complete": False,
        "machine": info,
        "params": {"variants": [v.label for v in args.variants], "tests": args.tests,
                   "jobs": args.jobs, "every": args.every, "as_root": args.as_root, "flavor": "ns",
                   "zdtm_dir": str(test_dir), "logs": str(args.logs)},
        "selected": [t.name for t in selection.tests],
        "skipped": selection.skipped,
    }
    with Testbed(["a", "b"], prefix=PREFIX, subnet=pick_free_subnet()) as bed:
        runs = run_all(bed, test_dir, selection.tests, args.variants, args, result)
    return {**result, "complete": True,
            "summary": summarize(runs, selection.tests, args.variants),
            "runs": [r.to_json() for r in runs], "elapsed_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def show(result: dict[str, Any]) -> None:
        report(result, args.out)
        console.print(f"total benchmark time {result['elapsed_s']:.0f} s")

    return run_main(lambda: bench(args), ZdtmError, show)


if __name__ == "__main__":
    sys.exit(main())
