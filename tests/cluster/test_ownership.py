"""Container ownership in etcd: the compare-and-swap commit and the per-container lock."""

from __future__ import annotations

import asyncio
import time

import pytest

from godwit.cluster import ownership
from godwit.cluster.ownership import MigrationLock, MigrationLocked, OwnershipConflict
from godwit.cluster.store import Store
from godwit.lab.etcd import EtcdCluster

pytestmark = pytest.mark.integration


def test_commit_moves_the_owner_only_from_the_expected_host(etcd: EtcdCluster,
                                                            prefix: str) -> None:
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            assert await ownership.owner(store, "web") is None
            claimed = await ownership.claim(store, "web", "a")
            assert (claimed.host, await ownership.owner(store, "web")) == ("a", claimed)
            assert await ownership.claim(store, "web", "a") == claimed  # idempotent
            with pytest.raises(OwnershipConflict, match="owned by a"):
                await ownership.claim(store, "web", "b")

            with pytest.raises(OwnershipConflict) as wrong:
                await ownership.commit_owner(store, "web", "c", "b")
            assert str(wrong.value) == ("container web is owned by a, not c: "
                                        "ownership not moved to b")
            assert await ownership.owner(store, "web") == claimed  # revision did not move

            moved = await ownership.commit_owner(store, "web", "a", "b")
            assert moved.host == "b" and moved.revision > claimed.revision
            assert await ownership.owner(store, "web") == moved
            # the same commit again (its first answer lost): the result, not a refusal
            assert await ownership.commit_owner(store, "web", "a", "b") == moved
            with pytest.raises(OwnershipConflict, match="owned by b, not a"):
                await ownership.commit_owner(store, "web", "a", "c")  # a second commit

            with pytest.raises(OwnershipConflict, match="owned by nobody"):
                await ownership.commit_owner(store, "nothing", "a", "b")
            assert not await ownership.release(store, "web", "a")
            assert await ownership.release(store, "web", "b")
            assert await ownership.owner(store, "web") is None

    asyncio.run(scenario())


def test_concurrent_commits_one_wins(etcd: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            await ownership.claim(store, "web", "a")
            results = await asyncio.gather(
                *(ownership.commit_owner(store, "web", "a", to) for to in ("b", "c", "d")),
                return_exceptions=True)
            winners = [r for r in results if isinstance(r, ownership.Owner)]
            assert len(winners) == 1, results
            assert all(isinstance(r, OwnershipConflict) for r in results if r not in winners)
            assert await ownership.owner(store, "web") == winners[0]

    asyncio.run(scenario())


def test_two_concurrent_migrations_one_refused(etcd: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            locks = [MigrationLock(store, "web", {"migration": m, "source": "a",
                                                  "destination": d})
                     for m, d in (("m1", "b"), ("m2", "c"))]
            results = await asyncio.gather(*(lock.acquire() for lock in locks),
                                           return_exceptions=True)
            refused = [r for r in results if isinstance(r, MigrationLocked)]
            assert len(refused) == 1 and results.count(None) == 1, results
            winner = locks[results.index(None)]
            message = str(refused[0])
            assert message.startswith("container web is already being migrated (migration "
                                      f"{winner.holder['migration']}, source a, destination")
            assert message.endswith("): refused") and "\n" not in message
            # a third attempt while the first runs: refused too; after release: taken
            with pytest.raises(MigrationLocked):
                await MigrationLock(store, "web", {"migration": "m3"}).acquire()
            await winner.release()
            async with MigrationLock(store, "web", {"migration": "m3"}) as lock:
                held = await store.get("locks/web")
                assert held and held.value["migration"] == "m3" and held.lease == lock.lease.id
            assert await store.get("locks/web") is None

    asyncio.run(scenario())


def test_lock_of_a_dead_holder_expires(etcd: EtcdCluster, prefix: str) -> None:
    """The lock is lease-bound: a holder that stops keepalive (died) frees it at expiry."""
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            dead = MigrationLock(store, "web", {"migration": "m1"}, ttl=3)
            await dead.acquire()
            await asyncio.sleep(4)  # kept alive past its TTL
            with pytest.raises(MigrationLocked):
                await MigrationLock(store, "web", {"migration": "m2"}).acquire()
            await dead.lease.stop(revoke=False)
            started = time.monotonic()
            while True:
                try:
                    await MigrationLock(store, "web", {"migration": "m2"}).acquire()
                    break
                except MigrationLocked:
                    assert time.monotonic() - started < 7, "the dead holder's lock stayed"
                    await asyncio.sleep(0.2)

    asyncio.run(scenario())
