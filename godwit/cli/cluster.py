"""The CLI's link to etcd in cluster mode (`godwit use-etcd`)."""

from __future__ import annotations

from godwit.cli.common import Context
from godwit.cluster import records
from godwit.cluster.store import Store
from godwit.errors import GodwitError


def cluster_store(ctx: Context) -> Store:
    """A store on the config's etcd, with the CLI's TLS files (`async with` it)."""
    files = ctx.tls_files()
    if files is None:
        raise GodwitError("cluster mode needs the CLI's TLS files: `godwit use-tls`")
    return Store(ctx.config.etcd, files)


async def cluster_history(ctx: Context, source: str | None) -> list[dict]:
    """Every migration report in etcd, oldest first (only those out of `source`)."""
    async with cluster_store(ctx) as store:
        reports = await records.history(store)
    return [r for r in reports if source is None or r.get("source") == source]
