"""An evacuation plan on a 3-member etcd cluster whose leader is killed mid-way: the plan
completes and every container runs exactly once (real agents, migrations and etcd)."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import _require_runtime, wait_for

from godwit.cluster import ownership
from godwit.cluster.store import Store
from godwit.lab.bundles import counter_bundle
from godwit.lab.cluster import cluster_testbed
from godwit.lab.etcd import EtcdCluster
from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration
NAMES = [f"tri{i}" for i in range(4)]


@pytest.fixture(scope="module")
def clustered() -> Iterator[tuple[Testbed, EtcdCluster]]:
    _require_runtime()
    with cluster_testbed(["a", "b", "c"], f"gw3e{os.getpid() % 10000}",
                         members=3) as clustered:
        yield clustered


def test_leader_killed_mid_evacuation(clustered) -> None:
    bed, etcd = clustered
    for name in NAMES:
        bundle = counter_bundle(bed.bundle_dir(name))
        assert bed.godwit("run", name, "--bundle", str(bundle), "--host", "a").returncode == 0
    started = bed.godwit("evacuate", "a", "--parallel", "1", "--cluster-parallel", "1",
                         "--commit-timeout", "10", "--detach", "--json")
    assert started.returncode == 0, started.stderr
    plan = json.loads(started.stdout)["plan"]
    landed = lambda: sum(1 for h in ("b", "c") for _ in  # noqa: E731
                         (bed.host(h).state_dir / "containers").glob("*/record.json"))
    wait_for(lambda: landed() >= 1, timeout=120, what="a first container landing")
    leader = asyncio.run(etcd.leader())
    etcd.kill_member(leader)
    try:
        watched = bed.godwit("evacuate", "--watch", plan, "--json", timeout=300)
    finally:
        etcd.start_member(leader)
        etcd.wait_healthy(leader)
    assert watched.returncode == 0 and "Traceback" not in watched.stderr, watched.stderr
    outcomes = {t["container"]: t for t in json.loads(watched.stdout)}
    assert {o["result"] for o in outcomes.values()} == {"ok"}, outcomes
    listing = json.loads(bed.godwit("ps", "--json").stdout)
    running = Counter(c["name"] for c in listing["containers"] if c["status"] == "running")
    rows = [(c["name"], c["host"], c["status"]) for c in listing["containers"]]
    assert running == Counter(NAMES), rows  # every container exactly once
    owners = asyncio.run(_owners(etcd))
    for row in listing["containers"]:
        assert owners[row["name"]] == row["host"] == outcomes[row["name"]]["destination"]


async def _owners(etcd: EtcdCluster) -> dict[str, str]:
    async with Store(etcd.urls, etcd.client_tls) as store:
        return {n: (await ownership.owner(store, n)).host for n in NAMES}
