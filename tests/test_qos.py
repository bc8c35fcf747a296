"""Migration traffic shaping (godwit.qos): real HTB on netns hosts, two competing TCP flows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import pytest
from pyroute2 import IPRoute

from godwit import qos
from godwit.errors import GodwitError
from godwit.lab.netns import HostNetwork, TestHost, cleanup_stale, pick_free_subnet
from godwit.qos import QosPolicy

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
PREFIX = f"gwq{os.getpid() % 100000}"
AGENT_PORT, OTHER_PORT = 7451, 5201
POLICY = QosPolicy(link_rate_mbit=200, migration_rate_mbit=50, migration_ceil_mbit=200)
WARMUP_S, MEASURE_S = 1.0, 3.0
PAYLOAD = 1448 / 1514  # HTB counts Ethernet frames; the receiver counts TCP payload

# One bulk TCP flow per port. "send" runs on host a, "recv" on host b; for a flow with
# a_listens the sender accepts (traffic leaves a *from* the port), else it connects (*to* it).
# recv prints per port the goodput in Mbit/s of each of BUCKETS slices of the window between
# two CLOCK_MONOTONIC instants.
FLOWS = r"""
import json, socket, sys, threading, time
role, peer, start, end, flows = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:5]), \
    json.loads(sys.argv[5])
BUCKETS, got = 12, {}

def endpoint(port, listen):
    if listen:
        with socket.create_server(("0.0.0.0", port)) as server:
            server.settimeout(10)
            return server.accept()[0]
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection((peer, port), timeout=1)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)

def run(port, a_listens):
    sock = endpoint(port, a_listens == (role == "send"))
    sock.settimeout(end - time.monotonic() + 5)
    data, buf, count = b"x" * 65536, bytearray(65536), [0] * BUCKETS
    with sock:
        while (now := time.monotonic()) < end:
            if role == "send":
                try:
                    sock.sendall(data)
                except OSError:
                    break
            else:
                if not (n := sock.recv_into(buf)):
                    break
                if now >= start:
                    count[int((now - start) / (end - start) * BUCKETS)] += n
    got[port] = [c * 8 * BUCKETS / (end - start) / 1e6 for c in count]

threads = [threading.Thread(target=run, args=flow) for flow in flows]
for t in threads:
    t.start()
for t in threads:
    t.join()
if role == "recv":
    print(json.dumps(got))
"""


@pytest.fixture
def net(tmp_path: Path) -> Iterator[HostNetwork]:
    network = HostNetwork(PREFIX, pick_free_subnet(), tmp_path / "hosts")
    try:
        network.add_host("a")
        network.add_host("b")
        yield network
    finally:
        network.destroy()
        cleanup_stale(PREFIX, tmp_path / "hosts")


def bridge_uplink(net: HostNetwork, host: TestHost) -> None:
    """Make ``br0`` the host's uplink, as on a server whose NIC is a bridge port."""
    with IPRoute(netns=host.netns, flags=0) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("add", ifname="br0", kind="bridge")
        br0 = ipr.link_lookup(ifname="br0")[0]
        ipr.addr("del", index=eth0, address=host.address, prefixlen=net.subnet.prefixlen)
        ipr.link("set", index=eth0, master=br0)
        ipr.addr("add", index=br0, address=host.address, prefixlen=net.subnet.prefixlen)
        ipr.link("set", index=br0, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=net.gateway)


def run_flows(net: HostNetwork, migration_from_agent: bool) -> dict[str, float]:
    """A migration-like flow (agent port) and a bulk flow (other port) from a to b at once;
    the median Mbit/s over 250 ms slices (robust to stalls when the machine is busy)."""
    a, b = net.hosts["a"], net.hosts["b"]
    start = time.monotonic() + WARMUP_S
    flows = json.dumps([[AGENT_PORT, migration_from_agent], [OTHER_PORT, False]])
    times = [str(start), str(start + MEASURE_S)]
    recv = net.run_in(b, [sys.executable, "-c", FLOWS, "recv", a.address, *times, flows],
                      stdout=subprocess.PIPE, text=True)
    send = net.run_in(a, [sys.executable, "-c", FLOWS, "send", b.address, *times, flows])
    out, _ = recv.communicate(timeout=WARMUP_S + MEASURE_S + 15)
    send.wait(timeout=10)
    assert recv.returncode == 0 and send.returncode == 0
    got = json.loads(out)
    return {"migration": round(median(got[str(AGENT_PORT)]), 1),
            "other": round(median(got[str(OTHER_PORT)]), 1)}


def test_policy_validation() -> None:
    assert QosPolicy(1000, 300, 800).default_rate_mbit == 700
    for bad in ((100, 0, 50), (100, 100, 100), (100, 60, 50), (100, 50, 150), (100, 10, 20, 0)):
        with pytest.raises(ValueError):
            QosPolicy(*bad)


@root_only
@pytest.mark.integration
@pytest.mark.parametrize("uplink", ["eth0", "br0"])
def test_migration_class_keeps_to_its_share(net: HostNetwork, uplink: str) -> None:
    """Link 200, migration 50/200, default 150/200; on eth0 the migration flow goes *to* the
    agent port (dport filter), on br0 it comes *from* it (sport filter)."""
    ns, from_agent = net.hosts["a"].netns, uplink == "br0"
    if uplink == "br0":
        bridge_uplink(net, net.hosts["a"])
    unshaped = run_flows(net, from_agent)
    qos.apply_policy(uplink, POLICY, ns)
    shaped = run_flows(net, from_agent)
    classes = qos.describe_policy(uplink, ns)["classes"]
    qos.clear_policy(uplink, ns)
    print(f"{uplink}: with policy {shaped}, without {unshaped} (Mbit/s)")

    assert shaped["other"] >= 0.9 * POLICY.default_rate_mbit * PAYLOAD
    assert 0.8 * 50 * PAYLOAD <= shaped["migration"] <= 1.2 * 50 * PAYLOAD
    assert unshaped["migration"] > 2 * POLICY.migration_rate_mbit  # the policy did it
    assert {c["rate_mbit"] for c in classes.values()} == {200, 50, 150}
    ratio = classes["migration"]["bytes"] / classes["default"]["bytes"]
    assert 0.25 < ratio < 0.45, classes  # the filters classified: 50:150 on the counters
    assert not qos.describe_policy(uplink, ns)["active"]

@root_only
@pytest.mark.integration
def test_apply_is_idempotent_and_foreign_qdiscs_are_left_alone(net: HostNetwork) -> None:
    ns = net.hosts["a"].netns
    qos.apply_policy("eth0", POLICY, ns)
    qos.apply_policy("eth0", QosPolicy(100, 20, 40), ns)
    classes = qos.describe_policy("eth0", ns)["classes"]
    assert classes["migration"]["ceil_mbit"] == 40 and classes["default"]["rate_mbit"] == 80
    qos.clear_policy("eth0", ns)
    qos.clear_policy("eth0", ns)
    with IPRoute(netns=ns, flags=0) as ipr:
        ipr.tc("add", "tbf", ipr.link_lookup(ifname="eth0")[0], 0x10000,
               rate="10mbit", burst=20000, latency="50ms")
    with pytest.raises(GodwitError, match="did not install"):
        qos.apply_policy("eth0", POLICY, ns)
    with pytest.raises(GodwitError, match="no interface"):
        qos.describe_policy("nosuch0", ns)
