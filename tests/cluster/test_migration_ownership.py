"""Migrations in cluster mode, end to end (netns hosts, real etcd, runc and CRIU): the owner
key moves by the destination's commit, the lock refuses a second migration, a commit whose
answer is lost is resolved from etcd, and no etcd means no freeze."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _require_runtime, cli_json, copies, wait_for

from godwit.cluster import ownership, records
from godwit.cluster.migration_hooks import COMMITTED, DECISIONS
from godwit.cluster.ownership import MigrationLock
from godwit.cluster.store import Store
from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.cluster import cluster_testbed, restart_in_cluster
from godwit.lab.etcd import EtcdCluster
from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration
OPTIONS = ("--commit-timeout", "8")


@pytest.fixture(scope="module")
def clustered() -> Iterator[tuple[Testbed, EtcdCluster]]:
    _require_runtime()
    with cluster_testbed(["a", "b"], f"gwo{os.getpid() % 100000}") as clustered:
        yield clustered


def etcd_read(etcd: EtcdCluster, read):
    async def go():
        async with Store(etcd.urls, etcd.client_tls) as store:
            return await read(store)

    return asyncio.run(go())


def start(bed: Testbed, name: str) -> None:
    bundle = counter_bundle(bed.bundle_dir(name))
    result = bed.godwit("run", name, "--bundle", str(bundle), "--host", "a")
    assert result.returncode == 0, result.stderr


def counting(bed: Testbed, name: str) -> None:
    row = next(c for c in cli_json(bed, "ps")["containers"] if c["name"] == name)
    before = read_count(Path(row["rootfs"]))
    wait_for(lambda: (read_count(Path(row["rootfs"])) or 0) > (before or 0),
             what=f"{name} counting on {row['host']}")


def migrate(bed: Testbed, name: str, *extra: str):
    return bed.godwit("migrate", name, "--to", "b", "--json", *OPTIONS, *extra, timeout=180)


def test_commit_moves_the_owner_and_the_report_is_in_etcd(clustered) -> None:
    bed, etcd = clustered
    start(bed, "own1")
    result = migrate(bed, "own1")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["result"] == "ok", result.stdout + result.stderr
    owner = etcd_read(etcd, lambda s: ownership.owner(s, "own1"))
    assert owner.host == "b"
    decision = etcd_read(etcd, lambda s: s.get(DECISIONS + report["id"]))
    assert decision.value == {"decision": COMMITTED, "host": "b"}
    assert etcd_read(etcd, lambda s: records.load_report(s, report["id"]))["result"] == "ok"
    history = cli_json(bed, "history")
    assert report["id"] in [r["id"] for r in history]
    assert not etcd_read(etcd, lambda s: s.list(ownership.LOCKS)), "lock released"
    assert copies(bed, "own1") == [("b", "running")]
    assert bed.godwit("rm", "own1", "--host", "b").returncode == 0
    assert etcd_read(etcd, lambda s: ownership.owner(s, "own1")) is None  # the name is free


def test_two_concurrent_migrations_one_is_refused(clustered) -> None:
    bed, _ = clustered
    start(bed, "own2")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: migrate(bed, "own2"), range(2)))
    ok = [r for r in runs if r.returncode == 0]
    refused = [r for r in runs if r.returncode != 0]
    assert len(ok) == 1 and len(refused) == 1, [(r.returncode, r.stderr) for r in runs]
    assert "already being migrated" in refused[0].stderr, refused[0].stderr
    assert refused[0].stderr.count("\n") == 1 and "Traceback" not in refused[0].stderr
    assert copies(bed, "own2") == [("b", "running")]
    counting(bed, "own2")


def test_lock_held_elsewhere_refuses_before_anything(clustered) -> None:
    """Another holder (an operator elsewhere, another agent) has the lock: refused, the
    container never frozen."""
    bed, etcd = clustered
    start(bed, "own3")

    async def held_elsewhere(store: Store):
        async with MigrationLock(store, "own3", {"migration": "m-elsewhere", "source": "z"}):
            return migrate(bed, "own3")

    result = etcd_read(etcd, held_elsewhere)
    assert result.returncode == 1
    assert "already being migrated (migration m-elsewhere, source z" in result.stderr
    assert copies(bed, "own3") == [("a", "running")]
    assert migrate(bed, "own3").returncode == 0  # the lock released: it goes
    assert copies(bed, "own3") == [("b", "running")]


def test_commit_then_destination_unreachable_resolved_by_owner_key(clustered) -> None:
    """b commits (owner key and decision in etcd) and dies before answering: in standalone
    mode that is in-doubt; here a reads the decision and the migration is ok."""
    bed, etcd = clustered
    start(bed, "own4")
    restart_in_cluster(bed, etcd, "b", GODWIT_FAULT="commit-done:crash")
    try:
        result = migrate(bed, "own4")
        assert "b" not in bed.agents or bed.agents["b"].poll() is not None, "b did not crash"
        report = json.loads(result.stdout)
        assert report["result"] == "ok", report
        assert etcd_read(etcd, lambda s: ownership.owner(s, "own4")).host == "b"
    finally:
        bed.stop_agent("b", signal.SIGKILL)
        restart_in_cluster(bed, etcd, "b")
    assert copies(bed, "own4") == [("b", "running")]  # b's copy survived its agent
    counting(bed, "own4")


def test_etcd_unavailable_refused_before_any_freeze(clustered) -> None:
    bed, etcd = clustered
    start(bed, "own5")
    member = etcd.members[0]
    etcd.kill_member(member)
    try:
        result = migrate(bed, "own5")
    finally:
        etcd.start_member(member)
        etcd.wait_healthy(member)
    assert result.returncode == 1, result.stdout
    assert "refused before anything was frozen" in result.stderr, result.stderr
    assert "etcd at" in result.stderr and result.stderr.count("\n") == 1
    assert copies(bed, "own5") == [("a", "running")]
    counting(bed, "own5")
