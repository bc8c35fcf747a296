"""Network-namespace test hosts (godwit.lab.netns)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from godwit.cgroups import CGROUP_PARENT, CGROUP_ROOT, hierarchies
from godwit.lab.netns import HostNetwork, TestHost, cleanup_stale, pick_free_subnet

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
PREFIX = f"gwt{os.getpid()}"

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(b"from-a")
    print(s.recv(100).decode())
"""


def leftovers(prefix: str, base_dir: Path) -> list[str]:
    """Every namespace, link, state dir or host cgroup dir still carrying ``prefix``."""
    with IPRoute() as ipr:
        links = [link.get("ifname") for link in ipr.link("dump")]
    names = [n for n in [*netns.listnetns(), *links] if n.startswith(f"{prefix}-")]
    cgroups = [str(p) for h in hierarchies() for p in (h / CGROUP_PARENT).glob(f"{prefix}-*")]
    return names + [str(p) for p in base_dir.glob(f"{prefix}-*")] + cgroups


def container_cgroup(host: TestHost) -> Path:
    """A cgroup where an agent of `host` puts a container (runc deletes it, not its
    parent): the parent is the host's to remove."""
    path = CGROUP_ROOT / "memory" / CGROUP_PARENT / host.netns / "c1"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return tmp_path / "hosts"


@pytest.fixture
def net(base_dir: Path) -> Iterator[HostNetwork]:
    network = HostNetwork(PREFIX, pick_free_subnet(), base_dir)
    try:
        yield network
    finally:
        network.destroy()
        cleanup_stale(PREFIX, base_dir)


def serve_once(listener: socket.socket) -> tuple[str, bytes]:
    """Accept one connection, echo its payload back; returns (peer address, payload)."""
    conn, (peer, _) = listener.accept()
    with conn:
        data = conn.recv(100)
        conn.sendall(b"echo:" + data)
    return peer, data


def test_prefix_and_name_validation() -> None:
    with pytest.raises(ValueError):
        HostNetwork("much-too-long-prefix")
    with pytest.raises(ValueError):
        HostNetwork("gw").add_host("Bad Name")


def test_testhost_is_not_collected() -> None:
    assert TestHost.__test__ is False


@pytest.mark.integration
@root_only
def test_tcp_between_hosts_and_root(net: HostNetwork) -> None:
    a, b, client = net.add_host("a"), net.add_host("b"), net.add_host("client")
    assert [a.address, b.address, client.address] == [
        str(net.subnet.network_address + i) for i in (2, 3, 4)
    ]
    assert a.runc_root.is_dir() and a.netns == f"{PREFIX}-a"
    with netns.create_socket(b.netns) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 7000))
        listener.listen()
        listener.settimeout(10)

        argv = [sys.executable, "-c", CLIENT, b.address, "7000"]
        proc = net.run_in(a, argv, stdout=subprocess.PIPE, text=True)
        assert serve_once(listener) == (a.address, b"from-a")
        assert proc.communicate(timeout=10) == ("echo:from-a\n", None)

        with socket.create_connection((b.address, 7000), timeout=5) as s:
            s.sendall(b"from-root")
            assert serve_once(listener) == (net.gateway, b"from-root")
            assert s.recv(100) == b"echo:from-root"

        with netns.create_socket(client.netns) as s:
            s.settimeout(5)
            s.connect((b.address, 7000))
            s.sendall(b"from-client")
            assert serve_once(listener) == (client.address, b"from-client")


@pytest.mark.integration
@root_only
def test_root_reaches_every_host_and_run_in_uses_netns(net: HostNetwork) -> None:
    hosts = [net.add_host(n) for n in ("a", "b")]
    for host in hosts:
        server = net.run_in(
            host,
            [sys.executable, "-c", "import http.server as h; h.test(port=7001, bind='0.0.0.0')"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ns_inode = os.stat(f"/run/netns/{host.netns}").st_ino
        assert os.stat(f"/proc/{server.pid}/ns/net").st_ino == ns_inode
        assert os.stat(f"/proc/{server.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
        connect_with_retry(host.address, 7001)


def connect_with_retry(address: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.integration
@root_only
def test_remove_host_and_destroy_leave_nothing(net: HostNetwork, base_dir: Path) -> None:
    a, b = net.add_host("a"), net.add_host("b")
    sleeper = net.run_in(a, ["sleep", "300"])
    cgroup = container_cgroup(a)
    container_cgroup(b)
    net.remove_host("a")
    assert sleeper.poll() is not None
    assert not Path(f"/run/netns/{a.netns}").exists() and not a.state_dir.exists()
    assert not cgroup.parent.exists()
    assert net.add_host("c").address == a.address  # freed address is reused
    net.destroy()
    net.destroy()  # idempotent
    assert leftovers(PREFIX, base_dir) == []
    assert not b.state_dir.exists()


@pytest.mark.integration
@root_only
def test_cleanup_stale(base_dir: Path) -> None:
    prefix = f"gws{os.getpid()}"
    crashed = HostNetwork(prefix, pick_free_subnet(), base_dir)
    try:
        crashed.add_host("a")
        cgroup = container_cgroup(crashed.add_host("b"))
        sleeper = crashed.run_in("b", ["sleep", "300"])
        expected = {f"{prefix}-{n}" for n in ("a", "b", "br", "v2", "v3")}
        expected |= {str(base_dir / f"{prefix}-{n}") for n in ("a", "b")}
        expected.add(str(cgroup.parent))
        assert set(leftovers(prefix, base_dir)) == expected
        removed = cleanup_stale(prefix, base_dir)
        assert sleeper.wait(10) != 0
        assert leftovers(prefix, base_dir) == []
        assert f"{prefix}-br" in removed and f"{prefix}-a" in removed
        assert f"/{CGROUP_PARENT}/{prefix}-b" in removed
        assert cleanup_stale(prefix, base_dir) == []
    finally:
        crashed.destroy()
        cleanup_stale(prefix, base_dir)


@pytest.mark.integration
@root_only
def test_same_prefix_twice_is_refused(net: HostNetwork, base_dir: Path) -> None:
    net.add_host("a")
    other = HostNetwork(PREFIX, pick_free_subnet(), base_dir)
    with pytest.raises(FileExistsError):
        other.add_host("b")
    other.destroy()  # must not touch the bridge it does not own
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname=net.bridge)
