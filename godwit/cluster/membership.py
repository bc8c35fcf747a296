"""Hosts of the cluster: each agent registers `hosts/<name>` on a lease it keeps alive.

A host whose agent stops (crash, kill, lost network) disappears from `live_hosts` once its
lease expires, `ttl` seconds after the last keepalive. An agent that stops cleanly revokes
its lease, so it disappears at once. If the lease expires while the agent lives (etcd was
out of reach longer than the TTL), the agent registers again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from godwit.cluster.lease import KeptLease
from godwit.cluster.store import ClusterUnavailable, Store

HOSTS = "hosts/"
DEFAULT_TTL_S = 10

log = logging.getLogger("godwit.cluster")


class Registration:
    """`await Registration(store, name, {"address": ...}).start()`; `stop()` at shutdown."""

    def __init__(self, store: Store, name: str, info: dict[str, Any], *,
                 ttl: int = DEFAULT_TTL_S) -> None:
        self.store = store
        self.name = name
        self.info = info
        self.ttl = ttl
        self.lease: KeptLease | None = None

    async def start(self) -> None:
        """Register now (ClusterUnavailable if etcd does not answer), then keep alive."""
        self.lease = await KeptLease.grant(self.store, self.ttl, f"host {self.name}",
                                           on_lost=self._register_again)
        record = {**self.info, "name": self.name, "registered": time.time()}
        await self.store.put(HOSTS + self.name, record, lease=self.lease.id)

    async def stop(self, *, revoke: bool = True) -> None:
        """Stop the keepalive; with `revoke` the host leaves at once, else at lease expiry."""
        if self.lease is not None:
            await self.lease.stop(revoke=revoke)
            self.lease = None

    async def _register_again(self) -> None:
        try:
            await self.start()
        except ClusterUnavailable as e:
            log.error("host %s could not register again: %s", self.name, e)


async def live_hosts(store: Store) -> dict[str, dict[str, Any]]:
    """Registered hosts whose lease is alive, by name."""
    return {e.key[len(HOSTS):]: e.value for e in await store.list(HOSTS)}
