"""Who runs a container, and who may migrate it.

`containers/<name>` holds `{"host": <owner>}`; its mod revision is the ownership's revision.
A migration first takes `locks/<name>`, a key on its own lease: a second migration of the
same container is refused while the first holds it, and a holder that dies releases it when
its lease expires. The destination takes over with `commit_owner`: one compare-and-swap
transaction from the expected owner to the new one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from godwit.cluster.lease import KeptLease
from godwit.cluster.store import Store
from godwit.errors import Conflict

CONTAINERS = "containers/"
LOCKS = "locks/"
LOCK_TTL_S = 15


class OwnershipConflict(Conflict):
    """The owner key does not say what the caller expected."""


class MigrationLocked(Conflict):
    """Another migration of the container holds its lock."""


@dataclass(frozen=True)
class Owner:
    container: str
    host: str
    revision: int


async def owner(store: Store, container: str) -> Owner | None:
    entry = await store.get(CONTAINERS + container)
    return Owner(container, entry.value["host"], entry.mod_revision) if entry else None


async def claim(store: Store, container: str, host: str) -> Owner:
    """Record `host` as the owner of a container nobody owns yet (idempotent for `host`)."""
    key = CONTAINERS + container
    reply = await store.txn([store.absent(key)], [store.op_put(key, {"host": host})],
                            [store.op_get(key)])
    if reply.succeeded:
        return Owner(container, host, reply.header.revision)
    current = store.entry_of(reply.responses[0])
    if current and current.value["host"] == host:
        return Owner(container, host, current.mod_revision)
    raise OwnershipConflict(f"container {container} is owned by {_host(current)}")


async def commit_owner(store: Store, container: str, from_host: str, to_host: str) -> Owner:
    """Move ownership from `from_host` to `to_host` in one transaction; refused (with the
    actual owner named) unless `from_host` owns it now. Idempotent: if `to_host` owns it
    already (an earlier attempt whose answer was lost applied; the migration lock excludes
    any other mover), that is the result. After the store's deadline, OutcomeUnknown: read
    `owner()` once etcd answers to learn the outcome."""
    key = CONTAINERS + container
    reply = await store.txn([store.same_value(key, {"host": from_host})],
                            [store.op_put(key, {"host": to_host})], [store.op_get(key)])
    if reply.succeeded:
        return Owner(container, to_host, reply.header.revision)
    current = store.entry_of(reply.responses[0])
    if current and current.value["host"] == to_host:
        return Owner(container, to_host, current.mod_revision)
    raise OwnershipConflict(f"container {container} is owned by {_host(current)}, "
                            f"not {from_host}: ownership not moved to {to_host}")


async def release(store: Store, container: str, host: str) -> bool:
    """Forget the owner of a removed container, if it is still `host`."""
    key = CONTAINERS + container
    reply = await store.txn([store.same_value(key, {"host": host})], [store.op_delete(key)])
    return bool(reply.succeeded)


class MigrationLock:
    """`async with MigrationLock(store, "web", {"migration": id, ...}):` — or MigrationLocked."""

    def __init__(self, store: Store, container: str, holder: dict[str, Any], *,
                 ttl: int = LOCK_TTL_S) -> None:
        self.store, self.container, self.holder, self.ttl = store, container, holder, ttl
        self.lease: KeptLease | None = None

    async def __aenter__(self) -> MigrationLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    async def acquire(self) -> None:
        key = LOCKS + self.container
        lease = await KeptLease.grant(self.store, self.ttl, f"migration lock {self.container}")
        record = {**self.holder, "since": time.time()}
        try:
            reply = await self.store.txn([self.store.absent(key)],
                                         [self.store.op_put(key, record, lease=lease.id)],
                                         [self.store.op_get(key)])
        except BaseException:
            await lease.stop()
            raise
        held = None if reply.succeeded else self.store.entry_of(reply.responses[0])
        if held is not None and held.lease != lease.id:  # not our own earlier attempt
            await lease.stop()
            raise MigrationLocked(f"container {self.container} is already being migrated "
                                  f"({_describe(held.value)}): refused")
        self.lease = lease

    async def release(self) -> None:
        """Revoking the lease deletes the lock key."""
        if self.lease is not None:
            await self.lease.stop(revoke=True)
            self.lease = None


def _host(entry: Any) -> str:
    return entry.value["host"] if entry else "nobody"


def _describe(holder: dict[str, Any]) -> str:
    parts = [f"{k} {holder[k]}" for k in ("migration", "source", "destination") if k in holder]
    if "since" in holder:
        parts.append(f"for {max(0.0, time.time() - holder['since']):.0f} s")
    return ", ".join(parts) or "holder unknown"
