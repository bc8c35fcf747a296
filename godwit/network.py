"""Container networking on one host: a named netns per container, bridged to the host's L2.

Layout (``host`` = a unique id of this host, ``c`` = the container)::

    host netns:  br0 (host IP) ── eth0 uplink
                  └─ gwc<hash(c)> ┄┄ eth0 (container IP, fixed MAC)  in netns gwc-<host>-<c>

The container's config.json points at ``/run/netns/gwc-<host>-<c>``, so runc treats the
netns as external: ``runc checkpoint`` passes ``--external net[<inode>]:extRootNetNS`` to
CRIU and ``runc restore`` hands the netns at that path to CRIU, which restores the
sockets into it. A migration moves the container's IP and MAC by re-creating the netns on
the destination and switching the L2 path:

* the host end of the veth is the switch: down = the container neither sends nor
  receives anything (a frozen kernel socket cannot ACK or answer ARP), up = it is on the
  segment; :func:`send_gratuitous_arp` then teaches the bridges where the MAC lives;
* :class:`godwit.packet_hold.PacketHold` queues (NFQUEUE) every IPv4 packet entering a
  pre-created netns until the socket is restored, then releases them at once, so TCP
  peers recover without waiting for their retransmission timeout.

All netlink work runs in a short-lived thread (joined to the target netns when one is
given): pyroute2's synchronous API cannot run inside an asyncio event loop, and setns
changes only the calling thread. The functions block; call them via asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import hashlib
import ipaddress
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from godwit.errors import GodwitError

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "gwc-"
VETH_PREFIX = "gwc"
CONTAINER_IFNAME = "eth0"
DEFAULT_BRIDGE = "br0"
LINK_TIMEOUT_S = 2.0
_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


@dataclass(frozen=True)
class ContainerNet:
    """A container's L3/L2 identity: ``ip`` in CIDR form, optional gateway, fixed MAC."""

    ip: str
    gateway: str | None = None
    mac: str = ""

    def __post_init__(self) -> None:
        if "/" not in self.ip or self.prefixlen == 32:
            raise ValueError(f"container ip needs a prefix, e.g. 10.0.0.5/24: {self.ip!r}")
        if self.gateway is not None:
            ipaddress.IPv4Address(self.gateway)
        if not self.mac:
            object.__setattr__(self, "mac", mac_for_ip(self.address))

    @property
    def address(self) -> str:
        return str(ipaddress.IPv4Interface(self.ip).ip)

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Interface(self.ip).network.prefixlen

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerNet:
        return cls(data["ip"], data.get("gateway"), data.get("mac") or "")


def mac_for_ip(address: str) -> str:
    """Locally administered unicast MAC ``02:00:<ip bytes>``: same IP, same MAC, any host."""
    packed = ipaddress.IPv4Address(address.split("/")[0]).packed
    return "02:00:" + ":".join(f"{b:02x}" for b in packed)


def netns_name(host: str, container: str) -> str:
    """Name of the container's netns; ``host`` must be unique per kernel (/run/netns is shared)."""
    return f"{NETNS_PREFIX}{host}-{container}"


def netns_path(host: str, container: str) -> Path:
    """The path to put in config.json (``oci_config(network_ns_path=...)``)."""
    return NETNS_DIR / netns_name(host, container)


def host_veth_name(container: str) -> str:
    """Host end of the container's veth (in the host netns): ``gwc`` + 10 hex digits."""
    return VETH_PREFIX + hashlib.sha256(container.encode()).hexdigest()[:10]


def config_with_netns(config: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """Copy of an OCI config.json whose network namespace is the (external) netns at
    ``path``: a restore on another host must point at that host's container netns."""
    new = copy.deepcopy(config)
    linux = new.setdefault("linux", {})
    others = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
    linux["namespaces"] = [*others, {"type": "network", "path": str(path)}]
    return new


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that joined netns ``name`` (None: the caller's netns)."""

    def target() -> T:
        if name is not None:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
        return fn()

    with ThreadPoolExecutor(1, thread_name_prefix="godwit-netns") as pool:
        return pool.submit(target).result()  # the thread ends here, its netns with it


def create_container_netns(
    host: str,
    container: str,
    net: ContainerNet,
    *,
    bridge: str = DEFAULT_BRIDGE,
    host_netns: str | None = None,
    connected: bool = True,
) -> Path:
    """Create the container's netns, veth and addressing; return the netns path.

    ``host_netns`` is where ``bridge`` lives (None: the caller's netns). With
    ``connected=False`` the host end stays down (a migration target before the switch).
    On failure everything created is removed.
    """
    path = create_private_netns(host, container)
    try:
        in_netns(host_netns, lambda: _add_veth(path.name, container, bridge))
        in_netns(path.name, lambda: _configure_container_side(net))
        if connected:
            set_link(container, True, host_netns=host_netns)
    except BaseException:
        delete_container_netns(host, container, host_netns=host_netns)
        raise
    return path


def create_private_netns(host: str, container: str) -> Path:
    """A netns with only the loopback, up (as runc would make it); also the start of a
    networked container's netns. As an external netns CRIU neither dumps nor restores it."""
    name = netns_name(host, container)
    if (NETNS_DIR / name).exists():
        raise FileExistsError(f"netns {name} exists")
    netns.create(name)
    try:
        in_netns(name, _loopback_up)
    except BaseException:
        delete_container_netns(host, container)
        raise
    return NETNS_DIR / name


def wants_own_netns(config: dict[str, Any]) -> bool:
    """The OCI config asks for a new network namespace (not the host's, not a given one)."""
    namespaces = config.get("linux", {}).get("namespaces", [])
    return any(ns.get("type") == "network" and not ns.get("path") for ns in namespaces)


def can_change_netns(config: dict[str, Any]) -> bool:
    """The container may reconfigure its own network namespace: CAP_NET_ADMIN in its
    bounding set, or a user namespace (where it holds every capability over its netns).
    Only then is there anything in the netns for CRIU to carry."""
    linux = config.get("linux", {})
    if any(ns.get("type") == "user" for ns in linux.get("namespaces", [])):
        return True
    bounding = config.get("process", {}).get("capabilities", {}).get("bounding", [])
    return "CAP_NET_ADMIN" in bounding


def _loopback_up() -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=link_index(ipr, "lo"), state="up")


def _add_veth(container_netns: str, container: str, bridge: str) -> None:
    veth = host_veth_name(container)
    with IPRoute() as ipr:
        br = link_index(ipr, bridge)
        peer = {"ifname": CONTAINER_IFNAME, "net_ns_fd": container_netns}
        ipr.link("add", ifname=veth, kind="veth", peer=peer)
        ipr.link("set", index=link_index(ipr, veth), master=br)


def _configure_container_side(net: ContainerNet) -> None:
    with IPRoute() as ipr:
        eth0 = link_index(ipr, CONTAINER_IFNAME)
        ipr.link("set", index=eth0, address=net.mac)
        ipr.addr("add", index=eth0, address=net.address, prefixlen=net.prefixlen)
        ipr.link("set", index=eth0, state="up")  # no carrier until the host end is up
        if net.gateway:
            ipr.route("add", dst="0.0.0.0/0", gateway=net.gateway, oif=eth0)


def set_link(
    container: str, up: bool, *, host_netns: str | None = None, timeout: float = LINK_TIMEOUT_S
) -> None:
    """Connect (``up``) or isolate the container by its veth's host end.

    Going up waits until the host end is operationally up (with STP off its bridge port
    forwards from then on), so a frame sent right after gets through. IPv4 routes in the
    container survive (its end stays administratively up, only the carrier goes).
    """
    veth = host_veth_name(container)

    def switch() -> None:
        with IPRoute() as ipr:
            idx = link_index(ipr, veth)
            ipr.link("set", index=idx, state="up" if up else "down")
            if up:
                _wait_oper_up(ipr, idx, veth, timeout)

    in_netns(host_netns, switch)


def _wait_oper_up(ipr: IPRoute, idx: int, ifname: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while ipr.link("get", index=idx)[0].get("IFLA_OPERSTATE") != "UP":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ifname} not operationally up after {timeout} s")
        time.sleep(0.0005)


def send_gratuitous_arp(
    netns_name_: str, ifname: str = CONTAINER_IFNAME, *, count: int = 2,
    timeout: float = LINK_TIMEOUT_S,
) -> None:
    """Broadcast ``count`` gratuitous ARP requests for the interface's IPv4 address from
    inside the netns: the bridges learn the MAC's port, peers refresh their ARP cache."""

    def send() -> socket.socket:
        with IPRoute() as ipr:
            idx = link_index(ipr, ifname)
            _wait_oper_up(ipr, idx, ifname, timeout)
            link = ipr.link("get", index=idx)[0]
            mac = bytes.fromhex(link.get("IFLA_ADDRESS").replace(":", ""))
            addrs = [a.get("IFA_ADDRESS") for a in ipr.addr("dump", index=idx, family=2)]
        if not addrs:
            raise RuntimeError(f"{ifname} has no IPv4 address")
        frame = _garp_frame(mac, ipaddress.IPv4Address(addrs[0]).packed)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            # Straight to the driver: the qdisc may not be re-activated yet after carrier-on.
            sock.setsockopt(_SOL_PACKET, _PACKET_QDISC_BYPASS, 1)
            sock.bind((ifname, 0))
            for _ in range(count):
                sock.send(frame)
        except BaseException:
            sock.close()
            raise
        return sock

    sock = in_netns(netns_name_, send)
    # Closing a packet socket waits for an RCU grace period (5-15 ms): not on the clock.
    threading.Thread(target=sock.close, daemon=True).start()


_SOL_PACKET, _PACKET_QDISC_BYPASS = 263, 20


def _garp_frame(mac: bytes, ip: bytes) -> bytes:
    """Ethernet broadcast + ARP request "who-has IP tell IP" from ``mac``."""
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp


def reset_connections(host: str, container: str, address: str) -> None:
    """Abort the container's TCP connections with other hosts (SOCK_DESTROY, `ss -K`).
    For a copy resumed after another copy of it ran and talked to its peers: its
    connection state is older than theirs, which would stall them until their own
    timeout; with the sockets gone, a peer's next segment is answered with a reset it
    accepts. Loopback connections and those to its own address stay."""
    argv = ["ip", "netns", "exec", netns_name(host, container), "ss", "-K", "-t", "-n", "-4",
            "state", "connected", "!", "dst", "127.0.0.0/8", "!", "dst", address]
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"ss -K failed: {result.stderr.strip()}")


def delete_container_netns(host: str, container: str, *, host_netns: str | None = None) -> None:
    """Remove the veth (both ends) and the netns; missing pieces are fine."""

    def delete_veth() -> None:
        with IPRoute() as ipr, contextlib.suppress(NetlinkError):
            for idx in ipr.link_lookup(ifname=host_veth_name(container)):
                ipr.link("del", index=idx)

    with contextlib.suppress(FileNotFoundError):  # the host netns may be gone already
        in_netns(host_netns, delete_veth)
    with contextlib.suppress(FileNotFoundError):
        netns.remove(netns_name(host, container))


class InterfaceNotFound(GodwitError, FileNotFoundError):
    """No network interface of that name (in the netns looked at)."""

    def __init__(self, ifname: str) -> None:
        super().__init__(f"no interface {ifname}")
        self.errno = errno.ENODEV


def link_index(ipr: IPRoute, ifname: str) -> int:
    """The index of interface `ifname`; `InterfaceNotFound` if there is none."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise InterfaceNotFound(ifname)
    return found[0]
