"""Hosts register on a lease: listed while kept alive, gone when the keepalive stops."""

from __future__ import annotations

import asyncio
import time

import pytest

from godwit.cluster.membership import Registration, live_hosts
from godwit.cluster.store import Store
from godwit.lab.etcd import EtcdCluster

pytestmark = pytest.mark.integration

TTL_S = 3  # short, with some slack for a loaded machine


async def _gone_within(store: Store, name: str, seconds: float) -> float:
    """Seconds until `name` leaves the live hosts; fails after `seconds`."""
    started = time.monotonic()
    while name in await live_hosts(store):
        assert time.monotonic() - started < seconds, f"{name} still listed after {seconds} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def test_registered_host_lives_while_kept_alive_and_expires_after(etcd: EtcdCluster,
                                                                  prefix: str) -> None:
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            a = Registration(store, "a", {"address": "10.0.0.2:7070"}, ttl=TTL_S)
            b = Registration(store, "b", {"address": "10.0.0.3:7070"}, ttl=TTL_S)
            await a.start()
            await b.start()
            hosts = await live_hosts(store)
            assert set(hosts) == {"a", "b"}
            assert hosts["a"]["address"] == "10.0.0.2:7070"
            entry = await store.get("hosts/a")
            assert entry and entry.lease == a.lease.id != 0
            await asyncio.sleep(2 * TTL_S)  # two TTLs: the keepalive holds both
            assert set(await live_hosts(store)) == {"a", "b"}
            await a.stop(revoke=False)  # a's agent stops keepalive (killed, cut off)
            waited = await _gone_within(store, "a", TTL_S + 3)
            assert waited > TTL_S / 2, f"a left after {waited:.1f} s, before its lease ran out"
            assert set(await live_hosts(store)) == {"b"}
            await b.stop()  # a clean stop revokes: b leaves at once
            assert await live_hosts(store) == {}

    asyncio.run(scenario())


def test_host_registers_again_when_its_lease_was_lost(etcd: EtcdCluster, prefix: str) -> None:
    """The lease expired behind the agent's back (etcd unreachable longer than the TTL):
    the next keepalive learns it and the host is registered again on a new lease."""
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            a = Registration(store, "a", {"address": "10.0.0.2:7070"}, ttl=TTL_S)
            await a.start()
            lost = a.lease.id
            await store.revoke(lost)  # the key goes with it (the keepalive may be back at once)
            deadline = time.monotonic() + TTL_S + 3
            while "a" not in await live_hosts(store):
                assert time.monotonic() < deadline, "a was not registered again"
                await asyncio.sleep(0.1)
            assert a.lease.id != lost
            await a.stop()

    asyncio.run(scenario())
