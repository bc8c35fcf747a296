"""What a migration does with etcd in cluster mode; a few calls from the source, the
receiver and the fence watchdog, none of which does anything in standalone mode.

- Before anything is touched, the source claims the owner key (`containers/<name>`, this
  host) and takes the migration lock (`locks/<name>`): a second migration of the container,
  from anywhere, is refused, and so is any migration while etcd does not answer.
- Right before the freeze the source checks its lock's lease is still alive: a lock lost
  (etcd out of reach longer than its TTL) stops the migration while nothing is frozen.
- The destination commits with one transaction: the owner moves from the source to it and
  `decisions/<migration id>` becomes `committed`, only if the owner is the source and
  nothing was decided yet.
- Whoever else ends the migration decides with the same key: the source, when the commit's
  answer was lost, writes `aborted` if nothing was decided; the destination's fence
  watchdog, at its deadline, writes `fenced`. The first decision holds, so the source
  learns every outcome from etcd, and a copy that does not own the key never runs on.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from godwit.cluster import ownership, records
from godwit.cluster.ownership import MigrationLock, OwnershipConflict
from godwit.cluster.store import ClusterUnavailable, Store
from godwit.errors import Conflict, GodwitError
from godwit.migration.states import DestinationState
from godwit.tls import TLSFiles

DECISIONS = "decisions/"
COMMITTED, ABORTED, FENCED = (DestinationState.COMMITTED, DestinationState.ABORTED,
                             DestinationState.FENCED)
log = logging.getLogger("godwit.cluster")


class LockLost(GodwitError):
    """The migration lock's lease expired before the freeze."""


@dataclass
class ClusterMigrations:
    """An agent's link to etcd for its migrations (the store connects when it joins)."""

    store: Store
    host: str
    joined: asyncio.Event = field(default_factory=asyncio.Event)  # the store is connected

    def source(self, name: str, migration_id: str, destination: str) -> SourceGuard:
        return SourceGuard(self, name, migration_id, destination)

    async def commit(self, migration_id: str, name: str, source: str) -> None:
        """Destination: take ownership from `source` and decide `committed`, in one
        transaction (idempotent); Conflict if the owner or the decision says otherwise."""
        owner_key, decision_key = ownership.CONTAINERS + name, DECISIONS + migration_id
        store = self.store
        reply = await store.txn(
            [store.same_value(owner_key, {"host": source}), store.absent(decision_key)],
            [store.op_put(owner_key, {"host": self.host}),
             store.op_put(decision_key, {"decision": COMMITTED, "host": self.host})],
            [store.op_get(owner_key), store.op_get(decision_key)])
        if reply.succeeded:
            return
        owner = store.entry_of(reply.responses[0])
        decided = store.entry_of(reply.responses[1])
        if decided and decided.value["decision"] == COMMITTED and owner and \
                owner.value["host"] == self.host:
            return  # an earlier attempt of ours applied
        if decided:
            raise Conflict(f"migration {migration_id} cannot commit: {decided.value['decision']} "
                           f"(etcd)")
        raise OwnershipConflict(f"migration {migration_id} cannot commit: {name} is owned by "
                                f"{owner.value['host'] if owner else 'nobody'}, not {source}")

    async def release_stale_locks(self) -> list[str]:
        """At the agent's start: the locks this host's previous agent process held (it
        died mid-migration; its recovery settles those migrations) go now rather than when
        their leases expire. Returns the containers unlocked."""
        store, released = self.store, []
        for entry in await store.list(ownership.LOCKS):
            if entry.value.get("source") == self.host:
                reply = await store.txn([store.same_value(entry.key, entry.value)],
                                        [store.op_delete(entry.key)])
                if reply.succeeded:
                    released.append(entry.key[len(ownership.LOCKS):])
        return released

    async def removed(self, name: str) -> None:
        """A container removed here: its owner key goes, if this host still owns it (an
        in-doubt leftover removed on the losing side leaves the winner's key alone)."""
        try:
            await ownership.release(self.store, name, self.host)
        except GodwitError as e:
            log.warning("owner key of %s not released: %s", name, e)

    async def save_report(self, report: dict) -> None:
        try:
            await records.save_report(self.store, report)
        except GodwitError as e:
            log.warning("report %s not written to etcd: %s", report.get("id"), e)

    def fence_args(self, tls: TLSFiles, migration_id: str) -> list[str]:
        """What the fence watchdog needs to ask etcd (see `settle_fence`)."""
        return [self.store.urls, str(tls.ca), str(tls.cert), str(tls.key),
                self.store.prefix, migration_id, self.host]


async def decide(store: Store, migration_id: str, decision: str, host: str) -> str:
    """Write `decision` unless one is there; the decision that holds afterwards."""
    key = DECISIONS + migration_id
    reply = await store.txn([store.absent(key)],
                            [store.op_put(key, {"decision": decision, "host": host})],
                            [store.op_get(key)])
    if reply.succeeded:
        return decision
    held = store.entry_of(reply.responses[0])
    return held.value["decision"] if held else decision


async def fence_decision(args: list[str]) -> str | None:
    """The fence watchdog's question: `fenced` unless a decision holds already; None while
    etcd does not answer. `args`: ClusterMigrations.fence_args."""
    urls, ca, cert, key, prefix, migration_id, host = args
    try:
        async with Store(urls, TLSFiles(Path(ca), Path(cert), Path(key)),
                         prefix=prefix) as store:
            return await decide(store, migration_id, FENCED, host)
    except ClusterUnavailable:
        return None


def settle_fence(args: list[str], runc: list[str], name: str, retry_s: float = 2.0) -> str:
    """The fence watchdog at its deadline, in cluster mode: the decision in etcd (`fenced`
    written if none). While etcd does not answer, the copy is paused (`runc` argv prefix):
    it may own the key or not, so it neither runs on nor dies; it resumes if committed."""
    decision = asyncio.run(fence_decision(args))
    if decision is not None:
        return decision
    subprocess.run([*runc, "pause", name], capture_output=True, check=False)
    while (decision := asyncio.run(fence_decision(args))) is None:
        time.sleep(retry_s)
    if decision == COMMITTED:
        subprocess.run([*runc, "resume", name], capture_output=True, check=False)
    return decision


class SourceGuard:
    """One outgoing migration: `await guard.begin()` before anything, `before_freeze()`,
    `outcome()` when the commit's answer is lost, `end(report)` at the very end."""

    def __init__(self, cluster: ClusterMigrations, name: str, migration_id: str,
                 destination: str) -> None:
        self.cluster, self.name, self.id = cluster, name, migration_id
        self.lock = MigrationLock(cluster.store, name, {
            "migration": migration_id, "source": cluster.host, "destination": destination})

    async def begin(self) -> None:
        """Claim the owner key (this host, if nobody owns it) and take the lock; refused
        (one line) if another host owns it, another migration holds it, or etcd is out."""
        try:
            await ownership.claim(self.cluster.store, self.name, self.cluster.host)
            await self.lock.acquire()
        except OwnershipConflict as e:
            raise Conflict(f"{e}, not this host ({self.cluster.host}): refused") from e
        except ClusterUnavailable as e:
            raise GodwitError(f"migration of {self.name} refused before anything was "
                              f"frozen: {e}") from e

    async def before_freeze(self) -> None:
        lease = self.lock.lease
        try:
            alive = lease is not None and await self.cluster.store.refresh(lease.id) > 0
        except ClusterUnavailable as e:
            raise LockLost(f"migration lock of {self.name} not confirmed before the freeze: "
                           f"{e}") from e
        if not alive:
            raise LockLost(f"migration lock of {self.name} lost before the freeze")

    async def outcome(self) -> str:
        """After a commit was sent: `committed`, or `aborted` (written now if nothing was
        decided, so the destination can no longer commit). ClusterUnavailable: unknown."""
        return await decide(self.cluster.store, self.id, ABORTED, self.cluster.host)

    async def decision(self) -> str | None:
        """`outcome()` for a restarted source agent: None while etcd does not answer."""
        await self.cluster.joined.wait()
        try:
            return await self.outcome()
        except ClusterUnavailable:
            return None

    async def end(self, report: dict) -> None:
        await self.cluster.save_report(report)
        await self.lock.release()
