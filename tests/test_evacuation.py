"""Evacuating a host: 5 containers, 2 at a time, one destination dies mid-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _require_runtime, wait_for

from godwit.evacuation import Planner
from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration
NAMES = [f"evac{i}" for i in range(5)]


@pytest.fixture(scope="module")
def bed3() -> Iterator[Testbed]:
    _require_runtime()
    with Testbed(["a", "b", "c"], prefix=f"gwe{os.getpid() % 100000}",
                 subnet=pick_free_subnet()) as testbed:
        yield testbed


def test_planner_spreads_by_free_memory() -> None:
    planner = Planner({"b": 1000, "c": 600})
    picks = [planner.pick(300, set()) for _ in range(4)]
    assert picks == ["b", "b", "c", "b"]  # always the most free memory left
    assert planner.free == {"b": 100, "c": 300}
    planner.down.add("b")
    assert planner.pick(1, set()) == "c"
    assert planner.pick(1, {"c"}) is None


def kill_when_first_container_lands(bed: Testbed, host: str, stop: threading.Event) -> None:
    containers = bed.host(host).state_dir / "containers"
    while not stop.wait(0.02):
        if any(containers.glob("*/record.json")):
            bed.stop_agent(host, signal.SIGKILL)
            return


def test_evacuation_survives_a_dying_destination(bed3: Testbed) -> None:
    for name in NAMES:
        bundle = counter_bundle(bed3.bundle_dir(name))
        assert bed3.godwit("run", name, "--bundle", str(bundle), "--host", "a").returncode == 0
    stop = threading.Event()
    killer = threading.Thread(target=kill_when_first_container_lands, args=(bed3, "c", stop))
    killer.start()
    env = {**os.environ, "GODWIT_CONFIG": str(bed3.config_path)}
    result = subprocess.run(
        [sys.executable, "-m", "godwit", "evacuate", "a", "--parallel", "2",
         "--commit-timeout", "10", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    stop.set()
    killer.join()
    assert "Traceback" not in result.stderr, result.stderr
    outcomes = {o["container"]: o for o in json.loads(result.stdout)}
    assert set(outcomes) == set(NAMES)
    assert "c" not in bed3.agents, "destination c should have been killed mid-way"
    bed3.start_agent("c")
    listing = json.loads(bed3.godwit("ps", "--json").stdout)
    assert not listing["errors"]
    running = Counter(c["name"] for c in listing["containers"] if c["status"] == "running")
    assert running == Counter(NAMES), listing  # every container exactly once
    where = {c["name"]: c["host"] for c in listing["containers"]}
    for name, outcome in outcomes.items():
        assert where[name] == (outcome["destination"] or "a"), outcome
    assert any(o["destination"] == "b" for o in outcomes.values())
    for row in listing["containers"]:
        rootfs = row["rootfs"]
        before = read_count(Path(rootfs))
        wait_for(lambda r=rootfs, b=before: (read_count(Path(r)) or 0) > b,
                 what=f"{row['name']} counting on {row['host']}")
