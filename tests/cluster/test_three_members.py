"""A 3-member etcd cluster keeps serving godwit with one member killed, leader included."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from godwit.cluster import ownership
from godwit.cluster.membership import Registration, live_hosts
from godwit.cluster.store import Store
from godwit.lab.etcd import EtcdCluster
from godwit.pki import CertificateAuthority

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trio(ca: CertificateAuthority):
    with EtcdCluster(ca, size=3, prefix=f"gw3m{os.getpid() % 10000}") as cluster:
        yield cluster


def test_leader_killed_cluster_still_serves(trio: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        async with Store(trio.urls, trio.client_tls, prefix=prefix) as store:
            host = Registration(store, "a", {"address": "10.0.0.2:7070"}, ttl=3)
            await host.start()
            await ownership.claim(store, "web", "a")
            leader = await trio.leader()
            trio.kill_member(leader)
            started = time.monotonic()
            moved = await ownership.commit_owner(store, "web", "a", "b")
            took = time.monotonic() - started
            assert moved.host == "b"
            assert took < store.timeout, f"the commit after the kill took {took:.1f} s"
            await store.put("after-kill", {"n": 1})
            await asyncio.sleep(4)  # past the host's TTL: its keepalive reached the others
            assert "a" in await live_hosts(store)
            assert (await ownership.owner(store, "web")).host == "b"
            assert leader != await trio.leader()
            await host.stop()
        trio.start_member(leader)  # back on its data dir, it catches up
        trio.wait_healthy(leader)
        async with Store(f"https://{leader.endpoint}", trio.client_tls, prefix=prefix) as one:
            assert (await one.get("after-kill")).value == {"n": 1}

    asyncio.run(scenario())


def test_follower_killed_cluster_still_serves(trio: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        leader = await trio.leader()
        follower = next(m for m in trio.members if m is not leader)
        trio.kill_member(follower)
        try:
            async with Store(trio.urls, trio.client_tls, prefix=prefix) as store:
                for i in range(20):  # round robin: some requests went to the dead member
                    await store.put(f"k{i}", {"i": i})
                assert len(await store.list("k")) == 20
        finally:
            trio.start_member(follower)
            trio.wait_healthy(follower)

    asyncio.run(scenario())
