"""An etcd lease kept alive in the background while its holder lives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from godwit.cluster.store import ClusterUnavailable, Store

log = logging.getLogger("godwit.cluster")


class KeptLease:
    """`lease = await KeptLease.grant(store, ttl, what)`; keys put with `lease.id` live as
    long as it does. `on_lost` runs if etcd reports the lease gone (expired while etcd was
    out of reach); `stop()` ends the keepalive and, with `revoke`, deletes its keys at once."""

    def __init__(self, store: Store, lease_id: int, ttl: int, what: str,
                 on_lost: Callable[[], Awaitable[None]] | None) -> None:
        self.store, self.id, self.ttl, self.what = store, lease_id, ttl, what
        self._on_lost = on_lost
        self._task = asyncio.create_task(self._keep_alive(), name=f"etcd-lease-{what}")

    @classmethod
    async def grant(cls, store: Store, ttl: int, what: str, *,
                    on_lost: Callable[[], Awaitable[None]] | None = None) -> KeptLease:
        return cls(store, await store.grant(ttl), ttl, what, on_lost)

    async def stop(self, *, revoke: bool = True) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if revoke:
            with contextlib.suppress(ClusterUnavailable):
                await self.store.revoke(self.id)

    async def _keep_alive(self) -> None:
        """Refresh every third of the TTL; a refused refresh means the lease is gone."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                alive = await self.store.refresh(self.id) > 0
            except ClusterUnavailable as e:
                log.warning("etcd lease of %s: keepalive failed: %s", self.what, e)
                continue
            if not alive:
                log.warning("etcd lease of %s expired", self.what)
                if self._on_lost is not None:
                    await self._on_lost()
                return
