"""An agent in cluster mode: its etcd connection and its host registration."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from godwit import __version__
from godwit.cluster.membership import Registration, live_hosts
from godwit.cluster.migration_hooks import ClusterMigrations
from godwit.cluster.plan_runner import LocalAgent, PlanRunner
from godwit.cluster.store import Store
from godwit.errors import GodwitError
from godwit.tls import TLSFiles

log = logging.getLogger("godwit.cluster")


class ClusterNode:
    """`await node.join(local)` once the agent listens (`local`: the agent itself, which
    runs its share of evacuation plans); `await node.leave()` when it stops."""

    def __init__(self, urls: str, tls: TLSFiles, name: str, listen: str) -> None:
        self.store = Store(urls, tls)
        self.name = name
        self.address = advertised_address(listen, self.store.endpoints[0])
        self.registration: Registration | None = None
        self.plans: PlanRunner | None = None
        self.migrations = ClusterMigrations(self.store, name)

    async def join(self, local: LocalAgent) -> None:
        """Connect and register (ClusterUnavailable, one line, if etcd does not answer)."""
        await self.store.connect()
        self.registration = Registration(self.store, self.name,
                                         {"address": self.address, "godwit": __version__})
        await self.registration.start()
        self.migrations.joined.set()
        for container in await self.migrations.release_stale_locks():
            log.warning("migration lock of %s released: held by this host's previous agent",
                        container)
        self.plans = PlanRunner(self.store, self.name, self._lease_id, local)
        self.plans.start()

    def _lease_id(self) -> int:
        lease = self.registration.lease if self.registration else None
        return lease.id if lease else 0

    async def leave(self) -> None:
        if self.plans is not None:
            await self.plans.stop()
        if self.registration is not None:
            await self.registration.stop()
        await self.store.close()


def advertised_address(listen: str, etcd_endpoint: str) -> str:
    """`host:port` peers reach the agent at: the listen address, or, when it listens on
    every address, the local address this host uses to reach etcd."""
    host, _, port = listen.rpartition(":")
    try:
        if host and not ipaddress.ip_address(host).is_unspecified:
            return listen
    except ValueError:  # a host name
        return listen
    etcd_host, _, etcd_port = etcd_endpoint.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((etcd_host, int(etcd_port)))  # UDP: picks the route, sends nothing
        except OSError as e:
            raise GodwitError(f"cannot reach etcd at {etcd_endpoint}: {e.strerror}") from e
        return f"{probe.getsockname()[0]}:{port}"


async def registered_hosts(urls: str, tls: TLSFiles) -> dict[str, dict[str, Any]]:
    """The live hosts of the cluster, by name, for the CLI."""
    async with Store(urls, tls) as store:
        return await live_hosts(store)
