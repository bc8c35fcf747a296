"""Migration traffic shaping on a host's uplink: HTB with a class for agent traffic (pyroute2).

Layout on the uplink's egress (handles in hex, ``6777`` = "gw")::

    6777: htb root, unclassified traffic -> 6777:20
      6777:1  link       rate = ceil = link rate
        6777:10  migration  rate R, ceil C     <- u32: TCP sport or dport in the agent's
                                                  32-port block (agent + page servers)
        6777:20  default    rate link - R, ceil link

Each leaf gets a pfifo with an explicit limit, independent of the device's txqueuelen
(0 on e.g. VLAN devices, which would make a one-packet queue). Only egress is shaped: a
host's incoming migration traffic is shaped by the sender's policy. Port matching assumes
IPv4 headers without options and IPv6 without extension headers, like ``tc ... match ip
dport``.

The functions block (pyroute2's sync API fails inside a running event loop): from async
code call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from godwit.api import DEFAULT_PORT
from godwit.errors import GodwitError
from godwit.network import link_index

ROOT, LINK, MIGRATION, DEFAULT = 0x67770000, 0x67770001, 0x67770010, 0x67770020
CLASS_NAMES = {LINK: "link", MIGRATION: "migration", DEFAULT: "default"}
LEAF_LIMIT_PKTS = 1000
BURST_S = 0.001  # bucket size: 1 ms of the rate (the tc default, ~1 MTU, undershoots)
MTU = 1600
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
PRIO = {ETH_P_IP: 1, ETH_P_IPV6: 2}
PORT_BLOCK_MASK = 0xFFE0


@dataclass(frozen=True)
class QosPolicy:
    """Link rate and the migration class's guaranteed rate and ceiling, in Mbit/s."""

    link_rate_mbit: float
    migration_rate_mbit: float
    migration_ceil_mbit: float
    agent_port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if not 0 < self.migration_rate_mbit < self.link_rate_mbit:
            raise ValueError("need 0 < migration rate < link rate")
        if not self.migration_rate_mbit <= self.migration_ceil_mbit <= self.link_rate_mbit:
            raise ValueError("need migration rate <= migration ceil <= link rate")
        if not 0 < self.agent_port < 65536:
            raise ValueError(f"invalid agent port {self.agent_port}")

    @property
    def default_rate_mbit(self) -> float:
        return self.link_rate_mbit - self.migration_rate_mbit


def apply_policy(ifname: str, policy: QosPolicy, netns: str | None = None) -> None:
    """Install (or replace) the godwit HTB tree on ``ifname``'s egress."""
    with _ipr(netns) as ipr:
        index = link_index(ipr, ifname)
        _remove_root(ipr, index, ifname)
        try:
            _install(ipr, index, policy)
        except BaseException:
            _remove_root(ipr, index, ifname)
            raise


def clear_policy(ifname: str, netns: str | None = None) -> None:
    """Remove the godwit HTB tree; the kernel's default qdisc comes back. Idempotent."""
    with _ipr(netns) as ipr:
        _remove_root(ipr, link_index(ipr, ifname), ifname)


def describe_policy(ifname: str, netns: str | None = None) -> dict:
    """``{"ifname", "active", "classes": {name: {rate_mbit, ceil_mbit, bytes, packets,
    drops}}}``; no classes when no godwit policy is installed."""
    with _ipr(netns) as ipr:
        index = link_index(ipr, ifname)
        ours = {msg["handle"]: msg for msg in ipr.get_classes(index=index)
                if msg["handle"] in CLASS_NAMES and msg.get_attr("TCA_KIND") == "htb"}
    classes = {CLASS_NAMES[h]: _class_info(ours[h]) for h in sorted(ours)}
    return {"ifname": ifname, "netns": netns, "active": bool(classes), "classes": classes}


def _install(ipr: IPRoute, index: int, policy: QosPolicy) -> None:
    link = policy.link_rate_mbit
    ipr.tc("add", "htb", index, ROOT, default=DEFAULT & 0xFFFF)
    for classid, parent, rate, ceil in (
        (LINK, ROOT, link, link),
        (MIGRATION, LINK, policy.migration_rate_mbit, policy.migration_ceil_mbit),
        (DEFAULT, LINK, policy.default_rate_mbit, link),
    ):
        ipr.tc("add-class", "htb", index, classid, parent=parent, **_rates(rate, ceil))
    for leaf in (MIGRATION, DEFAULT):
        ipr.tc("add", "pfifo", index, (leaf & 0xFFFF) << 16, parent=leaf, limit=LEAF_LIMIT_PKTS)
    for protocol, keys in _port_matches(policy.agent_port):  # one prio per protocol
        ipr.tc("add-filter", "u32", index, parent=ROOT, prio=PRIO[protocol],
               protocol=protocol, target=MIGRATION, keys=keys)


def _rates(rate_mbit: float, ceil_mbit: float) -> dict:
    rate, ceil = (round(mbit * 1e6 / 8) for mbit in (rate_mbit, ceil_mbit))
    return {"rate": rate, "ceil": ceil, "burst": max(MTU, round(rate * BURST_S)),
            "cburst": max(MTU, round(ceil * BURST_S))}


def migration_ports(agent_port: int) -> range:
    """The aligned block of 32 ports around the agent port: the agent's own, and the CRIU
    page servers of migrations (a post-copy source's, a stop-and-copy destination's), so
    one u32 mask classifies all of them."""
    start = agent_port & PORT_BLOCK_MASK
    return range(start, start + 32)


def _port_matches(port: int) -> Iterator[tuple[int, list[str]]]:
    """u32 keys ("value/mask+offset" from the network header) for a TCP sport/dport in the
    migration port block of `port`."""
    ipv4 = ["0x0/0x1fff+6", "0x6/0xff+9"]  # not a later fragment; protocol TCP
    ipv6 = ["0x6/0xff+6"]  # next header TCP
    block = port & PORT_BLOCK_MASK
    for offset in (0, 2):  # source port, destination port
        yield ETH_P_IP, [*ipv4, f"0x{block:04x}/0x{PORT_BLOCK_MASK:04x}+{20 + offset}"]
        yield ETH_P_IPV6, [*ipv6, f"0x{block:04x}/0x{PORT_BLOCK_MASK:04x}+{40 + offset}"]


def _class_info(msg) -> dict:
    options = msg.get_attr("TCA_OPTIONS")
    parms = options.get_attr("TCA_HTB_PARMS")
    stats = msg.get_attr("TCA_STATS2")
    basic = stats.get_attr("TCA_STATS_BASIC") or {}
    queue = stats.get_attr("TCA_STATS_QUEUE") or {}
    return {
        "classid": f"{msg['handle'] >> 16:x}:{msg['handle'] & 0xFFFF:x}",
        "rate_mbit": (options.get_attr("TCA_HTB_RATE64") or parms["rate"]) * 8 / 1e6,
        "ceil_mbit": (options.get_attr("TCA_HTB_CEIL64") or parms["ceil"]) * 8 / 1e6,
        "bytes": basic.get("bytes", 0),
        "packets": basic.get("packets", 0),
        "drops": queue.get("drops", 0),
    }


def _remove_root(ipr: IPRoute, index: int, ifname: str) -> None:
    """Delete the root qdisc if it is ours; refuse to touch someone else's configuration."""
    for qdisc in ipr.get_qdiscs(index=index):
        if qdisc["parent"] != 0xFFFFFFFF:
            continue
        if qdisc["handle"] == ROOT and qdisc.get_attr("TCA_KIND") == "htb":
            ipr.tc("del", index=index, handle=ROOT, parent=0xFFFFFFFF)
        elif qdisc["handle"] != 0:  # handle 0: the kernel's default (noqueue, mq, ...)
            raise GodwitError(f"{ifname} has a root qdisc godwit did not install "
                              f"({qdisc.get_attr('TCA_KIND')}); remove it first")


@contextlib.contextmanager
def _ipr(netns: str | None) -> Iterator[IPRoute]:
    try:
        with (IPRoute(netns=netns, flags=0) if netns else IPRoute()) as ipr:
            yield ipr
    except NetlinkError as exc:
        raise GodwitError(f"traffic control in {netns or 'root netns'}: {exc}") from exc
