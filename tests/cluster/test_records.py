"""Migration reports written to etcd make one cluster-wide history."""

from __future__ import annotations

import asyncio

import pytest

from godwit.cluster import records
from godwit.cluster.store import Store
from godwit.lab.etcd import EtcdCluster
from godwit.migration.report import MigrationReport, Phase

pytestmark = pytest.mark.integration


def _report(mid: str, container: str, source: str, started: float) -> dict:
    report = MigrationReport(id=mid, container=container, source=source, destination="z",
                             strategy="stop-and-copy", started_at=started,
                             finished_at=started + 1.5, result="ok", downtime_s=0.04,
                             phases=[Phase("dump", started, started + 0.02)])
    return report.to_json()


def test_reports_of_every_agent_in_one_history(etcd: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as a, \
                Store(etcd.urls, etcd.client_tls, prefix=prefix) as b:
            await records.save_report(a, _report("m2", "web", "a", 200.0))
            await records.save_report(b, _report("m1", "db", "b", 100.0))
            await records.save_report(b, _report("m3", "web", "b", 300.0))
            seen_by_a = await records.history(a)
            assert [r["id"] for r in seen_by_a] == ["m1", "m2", "m3"]
            assert [r["id"] for r in await records.history(b, container="web")] == ["m2", "m3"]
            loaded = await records.load_report(a, "m1")
            assert MigrationReport.from_json(loaded).to_json() == _report("m1", "db", "b", 100.0)
            assert await records.load_report(a, "nope") is None

    asyncio.run(scenario())
