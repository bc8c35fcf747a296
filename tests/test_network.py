"""Container networking (godwit.network) and the raw-runc proof that a TCP connection and
the container's IP survive a live migration (issue 4), without the agents.

Topology: hosts a and b with a container bridge ``br0``, and a client host, all on one L2
segment. The netserver container runs in its own netns on a; the client holds ONE TCP
connection and sends a numbered request every 10 ms while the container moves to b.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import _require_runtime
from netclient import PORT, Client, tcp_counters
from pyroute2 import netns

from godwit import network
from godwit.bundle import load_config, rewrite_for_host, save_config
from godwit.errors import GodwitError
from godwit.lab.netns import HostNetwork, TestHost, cleanup_stale, pick_free_subnet
from godwit.lab.workloads import netserver_bundle
from godwit.network import ContainerNet
from godwit.packet_hold import PacketHold
from godwit.runc import CheckpointOptions, Runc

PREFIX = f"gwn{os.getpid() % 100000}"
NAME = "srv"
STALL_TOLERANCE = 0.2
STALL_JITTER_S = 0.1  # scheduler jitter; a retransmission back-off would add >= 200 ms


# unit tests


def test_container_net_derives_a_stable_mac() -> None:
    net = ContainerNet("10.232.0.200/24", "10.232.0.1")
    assert net.mac == "02:00:0a:e8:00:c8" == network.mac_for_ip("10.232.0.200")
    assert (net.address, net.prefixlen) == ("10.232.0.200", 24)
    assert ContainerNet.from_json(net.to_json()) == net
    with pytest.raises(ValueError):
        ContainerNet("10.232.0.200")  # no prefix


def test_names_fit_the_kernel_limits() -> None:
    veth = network.host_veth_name("a-very-long-container-name-" * 2)
    assert len(veth) <= 15 and veth.startswith("gwc")
    assert network.netns_name("gw-a", "web") == "gwc-gw-a-web"
    assert network.netns_path("gw-a", "web") == Path("/run/netns/gwc-gw-a-web")


def test_a_missing_interface_is_one_line_for_operators_and_a_missing_file_for_callers() -> None:
    class NoLinks:
        def link_lookup(self, ifname: str) -> list[int]:
            return []

    with pytest.raises(network.InterfaceNotFound) as raised:
        network.link_index(NoLinks(), "eth9")  # type: ignore[arg-type]
    assert str(raised.value) == "no interface eth9"
    assert isinstance(raised.value, GodwitError) and isinstance(raised.value, FileNotFoundError)


def test_gratuitous_arp_frame() -> None:
    mac, ip = bytes.fromhex("02000ae800c8"), bytes([10, 232, 0, 200])
    frame = network._garp_frame(mac, ip)
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    assert frame[20:22] == b"\x00\x01"  # ARP request
    assert frame[22:28] == mac and frame[28:32] == ip == frame[38:42]


# TCP states (include/net/tcp_states.h) of a connected socket
CONNECTED_TCP_STATES = {"01", "02", "03", "04", "05", "08", "09", "0B"}


def has_established_tcp(pid: int) -> bool:
    """Whether the netns of ``pid`` has a connected TCP socket; listening and TIME_WAIT
    sockets do not count."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        if any(line.split()[3] in CONNECTED_TCP_STATES for line in lines if line.strip()):
            return True
    return False


# integration: fixtures and helpers


@dataclass
class Hosts:
    net: HostNetwork
    a: TestHost
    b: TestHost
    client: TestHost
    cnet: ContainerNet
    work: Path


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    _require_runtime()
    base = tmp_path / "hosts"
    net = HostNetwork(PREFIX, pick_free_subnet(), base)
    try:
        a = net.add_host("a", container_bridge=True)
        b = net.add_host("b", container_bridge=True)
        client = net.add_host("client")
        ip = f"{net.subnet.network_address + 200}/{net.subnet.prefixlen}"
        yield Hosts(net, a, b, client, ContainerNet(ip, net.gateway), tmp_path)
    finally:
        net.destroy()
        cleanup_stale(PREFIX, base)
    assert not [n for n in netns.listnetns() if PREFIX in n], "netns left behind"


def on_host(host: TestHost, coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a runc coroutine from the host's netns (as its agent would)."""
    return network.in_netns(host.netns, lambda: asyncio.run(coro()))


def ns_of(host: TestHost) -> str:
    return network.netns_name(host.netns, NAME)


def start_server(h: Hosts) -> Path:
    """Netserver container in its own netns on host a; returns its bundle."""
    path = network.create_container_netns(h.a.netns, NAME, h.cnet, host_netns=h.a.netns)
    bundle = netserver_bundle(h.work / "a", PORT, network_ns_path=str(path),
                              cgroups_path=f"/godwit/{h.a.netns}-{NAME}")
    on_host(h.a, lambda: Runc(h.a.runc_root).run_detached(NAME, bundle))
    return bundle


def copy_bundle(h: Hosts, bundle: Path, dest_netns: Path) -> Path:
    """The destination's bundle: same rootfs content, its own netns path and cgroup."""
    target = h.work / "b"
    shutil.copytree(bundle, target, symlinks=True)
    config = rewrite_for_host(load_config(target), rootfs=target / "rootfs",
                              cgroups_path=f"/godwit/{h.b.netns}-{NAME}")
    save_config(target, network.config_with_netns(config, dest_netns))
    return target


@dataclass
class Switchover:
    """The sequence of issue 4 with raw runc, step by step; ``t`` holds timestamps."""

    h: Hosts
    bundle: Path
    t: dict[str, float] = field(default_factory=dict)
    hold: PacketHold | None = None
    held: int = 0

    def prepare(self) -> Path:
        """Destination: the container netns (same IP/MAC), isolated, packets held."""
        path = network.create_container_netns(self.h.b.netns, NAME, self.h.cnet,
                                              host_netns=self.h.b.netns, connected=False)
        self.hold = PacketHold(ns_of(self.h.b)).start()
        return copy_bundle(self.h, self.bundle, path)

    def freeze_and_switch(self) -> None:
        a, b = self.h.a, self.h.b
        self.t["freeze"] = time.monotonic()
        on_host(a, lambda: Runc(a.runc_root).pause(NAME))
        self.t["paused"] = time.monotonic()
        network.set_link(NAME, False, host_netns=a.netns)  # frozen socket: no ACK, no ARP
        network.set_link(NAME, True, host_netns=b.netns)
        network.send_gratuitous_arp(ns_of(b))  # the bridges learn the MAC is on b now
        self.t["switched"] = time.monotonic()

    def dump(self, images: Path) -> None:
        a = self.h.a
        opts = CheckpointOptions(image_path=images, work_path=self.h.work / "dump-work",
                                 leave_running=True, tcp_established=True)
        on_host(a, lambda: Runc(a.runc_root).checkpoint(NAME, opts))
        self.t["dumped"] = time.monotonic()

    def restore(self, bundle: Path, images: Path) -> None:
        b = self.h.b
        on_host(b, lambda: Runc(b.runc_root).restore(
            NAME, bundle, images, self.h.work / "restore-work", tcp_established=True))
        self.t["restored"] = time.monotonic()
        assert self.hold is not None
        self.held = self.hold.release()
        self.t["released"] = self.hold.released_at or time.monotonic()

    def commit(self) -> None:
        """Delete the paused source copy while it is still isolated, then its netns."""
        a = self.h.a
        on_host(a, lambda: Runc(a.runc_root).delete(NAME))
        network.delete_container_netns(a.netns, NAME, host_netns=a.netns)

    def rollback(self) -> None:
        a, b = self.h.a, self.h.b
        if self.hold is not None:
            self.hold.discard()
        network.delete_container_netns(b.netns, NAME, host_netns=b.netns)
        network.set_link(NAME, True, host_netns=a.netns)
        network.send_gratuitous_arp(ns_of(a))
        on_host(a, lambda: Runc(a.runc_root).resume(NAME))
        self.t["resumed"] = time.monotonic()

    @property
    def downtime(self) -> float:
        """As godwit's report measures it: from `runc pause` returning to the restore
        (here: the release of the held packets) or the resume."""
        return self.t.get("released", self.t.get("resumed", 0)) - self.t["paused"]

    def timeline(self) -> str:
        return " ".join(f"{k}=+{(v - self.t['freeze']) * 1e3:.0f}ms" for k, v in self.t.items())


def migrate(h: Hosts, bundle: Path) -> Switchover:
    move = Switchover(h, bundle)
    try:
        dest_bundle = move.prepare()
        images = h.work / "images"
        images.mkdir()
        move.freeze_and_switch()
        move.dump(images)
        move.restore(dest_bundle, images)
        move.commit()
    except BaseException:
        if move.hold is not None:
            move.hold.discard()
        raise
    return move


def container_pid(host: TestHost) -> int:
    return on_host(host, lambda: Runc(host.runc_root).state(NAME)).pid


# integration tests


def udp_socket(ns: str, bind: tuple[str, int] | None = None) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if bind:
            sock.bind(bind)
        sock.settimeout(0.3)
        return sock

    return network.in_netns(ns, make)


@pytest.mark.integration
def test_container_netns_on_the_host_bridge_holds_and_cleans_up(hosts: Hosts) -> None:
    path = network.create_container_netns(hosts.a.netns, NAME, hosts.cnet,
                                          host_netns=hosts.a.netns)
    ns = ns_of(hosts.a)
    assert path == Path("/run/netns") / ns and hosts.a.bridge == "br0"
    server = udp_socket(ns, (hosts.cnet.address, PORT))
    client = udp_socket(hosts.client.netns)
    host_a = udp_socket(hosts.a.netns, (hosts.a.address, PORT))
    with server, client, host_a:
        client.sendto(b"to-host", (hosts.a.address, PORT))  # the host address is on br0
        assert host_a.recv(100) == b"to-host"
        client.sendto(b"direct", (hosts.cnet.address, PORT))
        assert server.recvfrom(100) == (b"direct", (hosts.client.address, client.getsockname()[1]))
        hold = PacketHold(ns).start()
        for i in range(5):
            client.sendto(b"held%d" % i, (hosts.cnet.address, PORT))
        with pytest.raises(TimeoutError):
            server.recv(100)
        assert hold.pending() >= 5  # plus any other IPv4 the segment carried meanwhile
        assert hold.release() >= 5
        assert [server.recv(100) for _ in range(5)] == [b"held%d" % i for i in range(5)]
        client.sendto(b"after", (hosts.cnet.address, PORT))
        assert server.recv(100) == b"after"
        assert PacketHold(ns).release() == 0  # no rule left: a no-op
        network.set_link(NAME, False, host_netns=hosts.a.netns)
        client.sendto(b"isolated", (hosts.cnet.address, PORT))
        with pytest.raises(TimeoutError):
            server.recv(100)
    with pytest.raises(FileExistsError):
        network.create_container_netns(hosts.a.netns, NAME, hosts.cnet, host_netns=hosts.a.netns)
    hosts.net.remove_host("a")  # takes the host's container netns along
    assert not path.exists()


@pytest.mark.integration
def test_cleanup_stale_removes_container_netns(tmp_path: Path) -> None:
    _require_runtime()
    prefix, base = f"gwk{os.getpid() % 100000}", tmp_path / "hosts"
    crashed = HostNetwork(prefix, pick_free_subnet(), base)
    try:
        host = crashed.add_host("a", container_bridge=True)
        net = ContainerNet(f"{crashed.subnet.network_address + 9}/24")
        network.create_container_netns(host.netns, NAME, net, host_netns=host.netns)
        assert f"{network.netns_name(host.netns, NAME)}" in cleanup_stale(prefix, base)
        assert not [n for n in netns.listnetns() if prefix in n]
    finally:
        crashed.destroy()
        cleanup_stale(prefix, base)


@pytest.mark.integration
def test_tcp_connection_survives_migration(hosts: Hosts) -> None:
    bundle = start_server(hosts)
    assert not has_established_tcp(container_pid(hosts.a))
    resets_before = tcp_counters(hosts.client)["EstabResets"]
    client = Client(hosts.client, hosts.cnet.address, socket.SOCK_STREAM)
    try:
        client.wait_replies(50)
        assert has_established_tcp(container_pid(hosts.a))
        move = migrate(hosts, bundle)
        pid = container_pid(hosts.b)
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(
            network.netns_path(hosts.b.netns, NAME)).st_ino, "not restored into its netns"
        client.wait_replies(100)  # also after the paused source copy was killed
    finally:
        client.close()
    stall = client.max_stall()
    print(f"\nTCP: stall {stall * 1e3:.0f} ms, downtime {move.downtime * 1e3:.0f} ms, "
          f"held {move.held} packets; {move.timeline()}")
    client.assert_stream_intact()
    assert tcp_counters(hosts.client)["EstabResets"] == resets_before, "the client got a RST"
    assert move.held > 0
    assert abs(stall - move.downtime) <= max(STALL_TOLERANCE * move.downtime, STALL_JITTER_S)


@pytest.mark.integration
def test_udp_service_continues_after_migration(hosts: Hosts) -> None:
    bundle = start_server(hosts)
    client = Client(hosts.client, hosts.cnet.address, socket.SOCK_DGRAM)
    try:
        client.wait_replies(50)
        move = migrate(hosts, bundle)
        client.wait_replies(100)
    finally:
        client.close()
    print(f"\nUDP: stall {client.max_stall() * 1e3:.0f} ms, downtime "
          f"{move.downtime * 1e3:.0f} ms, held {move.held}; {move.timeline()}")
    numbers = [n for _, n, _ in client.replies]
    counts = [c for _, _, c in client.replies]
    assert len(set(numbers)) == len(numbers), "a datagram was answered twice"
    assert counts == sorted(counts) and counts[-1] > counts[0] + 100, "server state lost"
    lost = set(range(numbers[0], numbers[-1])) - set(numbers)  # not before the server was up
    # a datagram sent just before the freeze can still wait, unread, in the server's socket
    window = (move.t["freeze"] - STALL_JITTER_S, move.t["released"] + STALL_JITTER_S)
    assert all(window[0] <= client.sent[n] <= window[1] for n in lost), "lost outside freeze"
    assert move.held > 0


@pytest.mark.integration
def test_rollback_resumes_the_source_with_the_connection(hosts: Hosts) -> None:
    bundle = start_server(hosts)
    client = Client(hosts.client, hosts.cnet.address, socket.SOCK_STREAM)
    move = Switchover(hosts, bundle)
    try:
        client.wait_replies(50)
        move.prepare()
        images = hosts.work / "images"
        images.mkdir()
        move.freeze_and_switch()
        move.dump(images)
        move.rollback()  # as if the restore had failed on b
        client.wait_replies(100)
    finally:
        if move.hold is not None:
            move.hold.discard()
        client.close()
    print(f"\nrollback: stall {client.max_stall() * 1e3:.0f} ms, downtime "
          f"{move.downtime * 1e3:.0f} ms; {move.timeline()}")
    client.assert_stream_intact()
    assert not network.netns_path(hosts.b.netns, NAME).exists()
