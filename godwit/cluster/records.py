"""Migration reports in etcd, so the history is the cluster's and not one agent's.

`migrations/<id>` holds a finished report (MigrationReport.to_json()), written by the agent
that ran it. Reports are small (phases, bytes, pre-flight findings), far below etcd's
request limit (1.5 MiB by default).
"""

from __future__ import annotations

from typing import Any

from godwit.cluster.store import Store

MIGRATIONS = "migrations/"


async def save_report(store: Store, report: dict[str, Any]) -> int:
    """Write (or overwrite) a report; returns the revision."""
    return await store.put(MIGRATIONS + report["id"], report)


async def load_report(store: Store, migration_id: str) -> dict[str, Any] | None:
    entry = await store.get(MIGRATIONS + migration_id)
    return entry.value if entry else None


async def history(store: Store, *, container: str | None = None) -> list[dict[str, Any]]:
    """Every report in the cluster, oldest first; only one container's if given."""
    reports = [e.value for e in await store.list(MIGRATIONS)]
    if container is not None:
        reports = [r for r in reports if r.get("container") == container]
    return sorted(reports, key=lambda r: r.get("started_at", 0))
