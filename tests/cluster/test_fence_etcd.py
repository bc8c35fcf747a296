"""The fence watchdog in cluster mode, against a real etcd: at its deadline an undecided
copy lives only if etcd says committed; otherwise `fenced` is written and it dies; while
etcd does not answer the copy is paused, not killed (runc is a recording script here: the
decision logic is what is tested; the kill itself is tests/test_fence.py's)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from godwit import fence
from godwit.cluster.migration_hooks import (
    ABORTED,
    COMMITTED,
    DECISIONS,
    FENCED,
    decide,
    settle_fence,
)
from godwit.cluster.store import Store
from godwit.lab.etcd import EtcdCluster
from godwit.migration.states import DestinationState

pytestmark = pytest.mark.integration


def _args(etcd: EtcdCluster, prefix: str, migration: str, urls: str | None = None) -> list:
    tls = etcd.client_tls
    return [urls or etcd.urls, str(tls.ca), str(tls.cert), str(tls.key), prefix, migration,
            "b"]


def _settle(args: list[str], runc: list[str]):
    return lambda: DestinationState.COMMITTED \
        if settle_fence(args, runc, "web", retry_s=0.2) == COMMITTED else DestinationState.FENCED


def _decided(etcd: EtcdCluster, prefix: str, migration: str, value: str | None) -> str:
    async def go() -> str:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            if value:
                await decide(store, migration, value, "a")
            return (await store.get(DECISIONS + migration)).value["decision"]

    return asyncio.run(go())


@pytest.mark.parametrize(("before", "killed", "after"), [
    (None, True, FENCED),  # nobody decided: the watchdog fences, in etcd first
    (ABORTED, True, ABORTED),  # the source gave up through etcd
    (COMMITTED, False, COMMITTED),  # committed in etcd, the local answer never came
])
def test_undecided_copy_follows_etcd(etcd: EtcdCluster, prefix: str, tmp_path: Path,
                                     before: str | None, killed: bool, after: str) -> None:
    migration = f"m-{before}"
    if before:
        _decided(etcd, prefix, migration, before)
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    runc = [str(_recording_runc(tmp_path))]
    settle = _settle(_args(etcd, prefix, migration), runc)
    assert fence._must_kill(decision, time.monotonic() + 0.3, settle) is killed
    assert _decided(etcd, prefix, migration, None) == after
    expected = DestinationState.FENCED if killed else DestinationState.COMMITTED
    assert fence.read_decision(decision) == expected
    assert not (tmp_path / "runc.calls").exists(), "etcd answered: nothing paused"


def test_copy_paused_while_etcd_is_away(etcd: EtcdCluster, prefix: str,
                                        tmp_path: Path) -> None:
    """etcd down at the deadline (it had recorded the commit): paused; etcd back: resumed,
    kept."""
    member = etcd.members[0]
    _decided(etcd, prefix, "m-away", COMMITTED)
    runc = [str(_recording_runc(tmp_path))]
    args = _args(etcd, prefix, "m-away")
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    etcd.kill_member(member)
    outcome: list[bool] = []
    watchdog = threading.Thread(target=lambda: outcome.append(
        fence._must_kill(decision, time.monotonic() + 0.2, _settle(args, runc))))
    watchdog.start()
    try:
        deadline = time.monotonic() + 30
        while "pause web" not in _calls(tmp_path):
            assert time.monotonic() < deadline, "the copy was not paused"
            time.sleep(0.2)
        assert watchdog.is_alive()
    finally:
        etcd.start_member(member)
        etcd.wait_healthy(member)
    watchdog.join(timeout=30)
    assert outcome == [False]
    assert _calls(tmp_path) == ["pause web", "resume web"]
    assert fence.read_decision(decision) == DestinationState.COMMITTED


def _recording_runc(tmp_path: Path) -> Path:
    script = tmp_path / "runc"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'runc.calls'}\n")
    script.chmod(0o755)
    return script


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "runc.calls"
    return path.read_text().splitlines() if path.exists() else []
