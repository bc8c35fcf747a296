"""Cluster mode end to end: agents in netns hosts register in etcd, `godwit hosts` reads it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from conftest import _require_runtime

from godwit.lab.cluster import restart_in_cluster, start_in_cluster
from godwit.lab.etcd import EtcdCluster
from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clustered() -> Iterator[tuple[Testbed, EtcdCluster]]:
    """Hosts a and b; etcd on the testbed's bridge (root namespace), agents in cluster mode;
    the CLI config names no host, only etcd."""
    _require_runtime()
    prefix = f"gwk{os.getpid() % 100000}"
    with Testbed(["a", "b"], prefix=prefix, subnet=pick_free_subnet()) as bed, \
            EtcdCluster(bed.ca, address=bed.net.gateway, prefix=prefix) as etcd:
        for name in bed.names:
            restart_in_cluster(bed, etcd, name)
        config = json.loads(bed.config_path.read_text())
        bed.config_path.write_text(json.dumps({**config, "hosts": {}, "etcd": etcd.urls}))
        yield bed, etcd


def listed(bed: Testbed) -> dict:
    result = bed.godwit("hosts", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def test_hosts_come_from_etcd_while_agents_live(clustered) -> None:
    bed, etcd = clustered
    hosts = listed(bed)
    assert sorted(hosts) == ["a", "b"], hosts
    assert all("error" not in info for info in hosts.values()), hosts
    assert hosts["a"]["name"] == "a"
    bed.stop_agent("b", signal.SIGKILL)  # no goodbye: b leaves when its lease expires
    deadline = time.monotonic() + 15
    while "b" in (hosts := listed(bed)):
        assert time.monotonic() < deadline, f"b still registered: {hosts}"
        time.sleep(0.5)
    assert sorted(hosts) == ["a"]
    start_in_cluster(bed, etcd, "b")
    assert sorted(listed(bed)) == ["a", "b"]


def test_agent_stops_when_etcd_is_unreachable(clustered) -> None:
    """The agent listens, then registers: with no etcd it exits, one line, in seconds."""
    bed, etcd = clustered
    dead = f"https://{bed.net.gateway}:1"
    bed.stop_agent("b")
    process = bed.start_agent("b", "--etcd", dead)
    assert process.wait(timeout=15) == 1
    log = bed.agent_log("b")
    assert f"error: etcd at {dead} is unavailable" in log, log[-800:]
    assert "Traceback" not in log.split(dead)[-1]
    start_in_cluster(bed, etcd, "b")


def test_cli_without_etcd_answer_is_one_line(clustered) -> None:
    bed, _ = clustered
    config = json.loads(bed.config_path.read_text())
    dead = f"https://{bed.net.gateway}:1"
    bed.config_path.write_text(json.dumps({**config, "etcd": dead}))
    try:
        started = time.monotonic()
        result = bed.godwit("hosts")
        assert time.monotonic() - started < 15
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: etcd at {dead} is unavailable")
        assert result.stderr.count("\n") == 1, result.stderr
    finally:
        bed.config_path.write_text(json.dumps(config))
