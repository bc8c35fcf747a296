"""Evacuation plans end to end: real agents in netns hosts, real etcd, real migrations. The
CLI that wrote the plan is killed and the source agent restarted mid-way; the plan still
completes and every container runs exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _require_runtime, wait_for

from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.cluster import cluster_testbed, start_in_cluster
from godwit.lab.etcd import EtcdCluster
from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration
NAMES = [f"plan{i}" for i in range(4)]


@pytest.fixture(scope="module")
def clustered() -> Iterator[tuple[Testbed, EtcdCluster]]:
    """Hosts a, b, c in cluster mode; the CLI config keeps the hosts (for run and ps)."""
    _require_runtime()
    with cluster_testbed(["a", "b", "c"], f"gwp{os.getpid() % 100000}") as clustered:
        yield clustered


def _tasks_of(bed: Testbed, plan: str) -> list[dict]:
    """The plan's tasks as `evacuate --watch --json` prints them once the plan is done."""
    result = bed.godwit("evacuate", "--watch", plan, "--json", timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_plan_completes_without_its_cli_and_across_an_agent_restart(clustered) -> None:
    bed, etcd = clustered
    for name in NAMES:
        bundle = counter_bundle(bed.bundle_dir(name))
        assert bed.godwit("run", name, "--bundle", str(bundle), "--host", "a").returncode == 0
    env = {**os.environ, "GODWIT_CONFIG": str(bed.config_path), "COLUMNS": "120"}
    cli = subprocess.Popen(
        [sys.executable, "-m", "godwit", "evacuate", "a", "--parallel", "1",
         "--cluster-parallel", "1", "--commit-timeout", "10"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = wait_for(lambda: _plan_line(cli), timeout=60, what="the plan's first line")
    plan = first.split()[1].rstrip(":")
    cli.send_signal(signal.SIGKILL)  # the CLI dies: the agents go on
    cli.wait()
    landed = lambda: sum(1 for h in ("b", "c") for _ in  # noqa: E731
                         (bed.host(h).state_dir / "containers").glob("*/record.json"))
    wait_for(lambda: landed() >= 1, timeout=120, what="a first container landing")
    bed.stop_agent("a", signal.SIGKILL)  # the source agent dies, between or in migrations
    start_in_cluster(bed, etcd, "a")
    outcomes = {t["container"]: t for t in _tasks_of(bed, plan)}
    assert set(outcomes) == set(NAMES)
    assert {o["result"] for o in outcomes.values()} == {"ok"}, outcomes
    listing = json.loads(bed.godwit("ps", "--json").stdout)
    running = Counter(c["name"] for c in listing["containers"] if c["status"] == "running")
    assert running == Counter(NAMES), listing  # every container exactly once
    for row in listing["containers"]:
        assert row["host"] == outcomes[row["name"]]["destination"] != "a", row
        before = read_count(Path(row["rootfs"]))
        wait_for(lambda r=row["rootfs"], b=before: (read_count(Path(r)) or 0) > b,
                 what=f"{row['name']} counting on {row['host']}")


def _plan_line(cli: subprocess.Popen) -> str | None:
    """The CLI's first line, `plan <id>: evacuating …` (None while it has not printed)."""
    assert cli.stdout is not None
    line = cli.stdout.readline()
    if not line and cli.poll() is not None:
        raise AssertionError(f"evacuate exited {cli.returncode} before printing its plan")
    return line if line.startswith("plan ") else None


def test_watch_without_a_running_plan_is_one_line(clustered) -> None:
    bed, _ = clustered
    started = time.monotonic()
    result = bed.godwit("evacuate", "--watch")
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert result.stderr.startswith("error: 0 running plans (none)"), result.stderr
    assert result.stderr.count("\n") == 1
