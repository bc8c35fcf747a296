"""Test/demo "hosts" on one machine: network namespaces joined by a bridge (pyroute2).

Layout for prefix ``gw`` and subnet ``10.231.0.0/24``::

    root ns:  gw-br (10.231.0.1/24) ── gw-v2 ┄┄ eth0 (10.231.0.2) in netns gw-a
                                     └─ gw-v3 ┄┄ eth0 (10.231.0.3) in netns gw-b

With ``add_host(name, container_bridge=True)`` the host's eth0 is enslaved to a bridge
``br0`` inside the host netns that carries the host address, so containers bridged there
(godwit.network) share the hosts' L2 segment::

    netns gw-a:  br0 (10.231.0.2/24) ── eth0 ┄┄ gw-v2 (root ns, on gw-br)
                   └─ gwc… ┄┄ eth0 (container IP) in netns gwc-gw-a-<container>

Every name created here starts with ``<prefix>-``, so runs with different prefixes
coexist and :func:`cleanup_stale` can find the leftovers of a crashed run. Container
netns of a host are expected to be named ``gwc-<host netns>-<container>``
(``godwit.network.netns_name(host.netns, container)``) and are removed with the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from godwit import cgroups, tmpfs
from godwit.cgroups import CGROUP_PARENT
from godwit.network import _CLONE_NEWNET, DEFAULT_BRIDGE, NETNS_DIR, NETNS_PREFIX
from godwit.runc import CURRENT_RUNC, DEFAULT_RUNC

DEFAULT_BASE_DIR = Path("/run/godwit-hosts")
RUNCS = (DEFAULT_RUNC, str(CURRENT_RUNC))  # a test host's agent may run either
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,9}")  # "<prefix>-v254" must fit IFNAMSIZ-1 = 15
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


@dataclass
class TestHost:
    """One simulated host: a network namespace with its own state dir and runc root."""

    __test__ = False  # not a pytest test class

    name: str
    netns: str
    address: str
    state_dir: Path
    runc_root: Path
    bridge: str | None = None  # the container bridge in the host netns, if any


class HostNetwork:
    """A bridge in the root namespace plus one network namespace per host, joined by veths."""

    def __init__(
        self,
        prefix: str = "gw",
        subnet: str = "10.231.0.0/24",
        base_dir: Path = DEFAULT_BASE_DIR,
    ) -> None:
        _check_prefix(prefix)
        self.prefix = prefix
        self.subnet = ipaddress.IPv4Network(subnet)
        self.base_dir = Path(base_dir)
        self.bridge = f"{prefix}-br"
        self.gateway = str(next(self.subnet.hosts()))
        self.hosts: dict[str, TestHost] = {}
        self._procs: dict[str, list[subprocess.Popen]] = {}
        self._bridge_ready = False

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def add_host(self, name: str, *, container_bridge: bool = False) -> TestHost:
        """Create netns ``<prefix>-<name>`` with the next free address on the bridge.

        ``container_bridge``: the host address sits on a bridge ``br0`` in the host netns
        that enslaves eth0, for containers with their own netns on the hosts' segment.
        """
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"host name must match {_NAME_RE.pattern}: {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        self._ensure_bridge()
        address = self._free_address()
        ns = f"{self.prefix}-{name}"
        state_dir = self.base_dir / ns
        bridge = DEFAULT_BRIDGE if container_bridge else None
        host = TestHost(name, ns, address, state_dir, state_dir / "runc", bridge)
        self.hosts[name] = host
        try:
            netns.create(ns)
            self._plug(host)
            host.runc_root.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.remove_host(name)
            raise
        return host

    def remove_host(self, name: str) -> None:
        """Stop the host's processes and containers, remove its netns, veth and state dir."""
        host = self.hosts.pop(name, None)
        for proc in self._procs.pop(name, []):
            _stop_process(proc)
        if host is None:
            return
        _delete_containers(host.runc_root)
        _remove_host_cgroups(host.netns)
        others = [f"{NETNS_PREFIX}{h.netns}-" for h in self.hosts.values()]
        _remove_netns_with_prefix(f"{NETNS_PREFIX}{host.netns}-", exclude=others)
        _delete_link(self._veth(host.address))
        _kill_and_remove_netns(host.netns)
        _remove_state_dir(host.state_dir)

    def destroy(self) -> None:
        """Remove every host and the bridge; idempotent."""
        for name in list(self.hosts):
            self.remove_host(name)
        if self._bridge_ready:
            _delete_link(self.bridge)
            self._bridge_ready = False
        with contextlib.suppress(OSError):
            self.base_dir.rmdir()  # only if empty: other runs may share it

    def run_in(
        self, host: TestHost | str, argv: Sequence[str], **popen_kw: Any
    ) -> subprocess.Popen:
        """Start ``argv`` inside the host's network namespace (only the netns changes).

        Unlike ``ip netns exec`` this keeps the mount namespace, so /sys/fs/cgroup stays
        visible to runc. The process is stopped by :meth:`remove_host`/:meth:`destroy`.
        """
        host = self.hosts[host if isinstance(host, str) else host.name]
        fd = os.open(NETNS_DIR / host.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            popen_kw["preexec_fn"] = _setns_preexec(fd, popen_kw.get("preexec_fn"))
            proc = subprocess.Popen(list(argv), **popen_kw)
        finally:
            os.close(fd)
        self._procs.setdefault(host.name, []).append(proc)
        return proc

    def _ensure_bridge(self) -> None:
        if self._bridge_ready:
            return
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=self.bridge):
                raise FileExistsError(f"{self.bridge} exists: cleanup_stale({self.prefix!r})?")
            _check_subnet_free(ipr, self.subnet)
            self._bridge_ready = True  # from here on, destroy() removes it
            ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=idx, address=self.gateway, prefixlen=self.subnet.prefixlen)
            ipr.link("set", index=idx, state="up")

    def _free_address(self) -> str:
        used = {self.gateway} | {h.address for h in self.hosts.values()}
        for ip in self.subnet.hosts():
            if str(ip) not in used:
                return str(ip)
        raise RuntimeError(f"subnet {self.subnet} is full")

    def _veth(self, address: str) -> str:
        return f"{self.prefix}-v{address.rsplit('.', 1)[1]}"

    def _plug(self, host: TestHost) -> None:
        veth = self._veth(host.address)
        with IPRoute() as ipr:
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link(
                "add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": host.netns}
            )
            ipr.link("set", index=ipr.link_lookup(ifname=veth)[0], master=br, state="up")
        with IPRoute(netns=host.netns, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            uplink = eth0
            if host.bridge:  # its MAC fixed to eth0's: container ports come and go
                mac = ipr.link("get", index=eth0)[0].get_attr("IFLA_ADDRESS")
                ipr.link("add", ifname=host.bridge, kind="bridge", address=mac)
                uplink = ipr.link_lookup(ifname=host.bridge)[0]
                ipr.link("set", index=eth0, master=uplink, state="up")
            ipr.addr("add", index=uplink, address=host.address, prefixlen=self.subnet.prefixlen)
            ipr.link("set", index=uplink, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=self.gateway)


def cleanup_stale(prefix: str = "gw", base_dir: Path = DEFAULT_BASE_DIR) -> list[str]:
    """Remove leftovers of a crashed run: ``<prefix>-*`` netns (and their processes),
    links, state dirs, the runc containers in them and the hosts' cgroup dirs. Returns
    the removed names."""
    _check_prefix(prefix)
    mark = f"{prefix}-"
    removed: list[str] = []
    for state_dir in sorted(base_dir.glob(f"{mark}*")):
        _delete_containers(state_dir / "runc")
        _remove_state_dir(state_dir)
        removed.append(str(state_dir))
    removed += _remove_host_cgroups(f"{mark}*")
    removed += _remove_netns_with_prefix(f"{NETNS_PREFIX}{mark}")  # containers first
    removed += _remove_netns_with_prefix(mark)
    with IPRoute() as ipr:
        names = [link.get("ifname") for link in ipr.link("dump")]
    for name in sorted(n for n in names if n and n.startswith(mark)):
        _delete_link(name)
        removed.append(name)
    return removed


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
    if f"{prefix}-" == NETNS_PREFIX:
        raise ValueError(f"prefix {prefix!r} is reserved for container netns")


def pick_free_subnet(base: str = "10.232.0.0/16", prefixlen: int = 24) -> str:
    """First ``/prefixlen`` inside ``base`` that no root-namespace route overlaps."""
    with IPRoute() as ipr:
        for net in ipaddress.IPv4Network(base).subnets(new_prefix=prefixlen):
            if not _overlapping_routes(ipr, net):
                return str(net)
    raise RuntimeError(f"no free /{prefixlen} in {base}")


def _overlapping_routes(ipr: IPRoute, net: ipaddress.IPv4Network) -> list[str]:
    found = []
    for route in ipr.route("dump", family=2, table=254):
        dst = route.get("dst") or "0.0.0.0"
        if route["dst_len"] == 0:
            continue  # the default route overlaps everything
        other = ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
        if other.overlaps(net):
            found.append(str(other))
    return found


def _check_subnet_free(ipr: IPRoute, net: ipaddress.IPv4Network) -> None:
    if clash := _overlapping_routes(ipr, net):
        raise RuntimeError(f"subnet {net} overlaps existing routes {clash}; pick another")


def _setns_preexec(fd: int, then: Callable[[], Any] | None) -> Callable[[], None]:
    setns = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).setns

    def preexec() -> None:
        if setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        if then is not None:
            then()

    return preexec


def _stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _delete_containers(runc_root: Path) -> None:
    """``runc delete --force`` every container under ``runc_root`` (kills and removes cgroups),
    with the next runc binary when one leaves it there."""
    if not runc_root.is_dir():
        return
    for state in runc_root.glob("*/state.json"):
        for runc in RUNCS:
            if not state.exists():
                break
            if not shutil.which(runc):
                continue
            subprocess.run(
                [runc, "--root", str(runc_root), "delete", "--force", state.parent.name],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )


def _remove_host_cgroups(pattern: str) -> list[str]:
    """The hosts' cgroup dirs ``/godwit/<pattern>``, where empty: runc deletes a
    container's own cgroup, not the host's dir above it (see
    ``ContainerStore.cgroups_path``). Returns those removed, as ``/godwit/<id>``."""
    return [f"/{rel}" for rel in cgroups.remove_empty(f"{CGROUP_PARENT}/{pattern}")]


def _delete_link(name: str) -> None:
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        for idx in ipr.link_lookup(ifname=name):
            ipr.link("del", index=idx)


def _remove_netns_with_prefix(prefix: str, exclude: Sequence[str] = ()) -> list[str]:
    """Kill the processes of, and remove, every named netns starting with ``prefix`` (but
    not with a longer prefix in ``exclude``)."""
    names = [n for n in netns.listnetns() if n.startswith(prefix)]
    names = sorted(n for n in names if not any(n.startswith(x) for x in exclude if x != prefix))
    pids = netns.ns_pids() if names else {}
    for ns in names:
        _kill_and_remove_netns(ns, pids)
    return names


def _kill_and_remove_netns(name: str, pids: dict[str, list[int]] | None = None) -> None:
    """Kill what still runs in netns ``name`` (a daemon an agent left in its own session),
    then remove it."""
    for pid in (netns.ns_pids() if pids is None else pids).get(name, []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _remove_netns(name)


def _remove_netns(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


def _remove_state_dir(state_dir: Path) -> None:
    """A host's state dir, with what an agent mounted there (a migration's images tmpfs)."""
    tmpfs.release_all_under(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)
