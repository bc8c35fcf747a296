"""A testbed in cluster mode: netns hosts whose agents register in a lab etcd on the hosts'
bridge, and a CLI config that names etcd (and keeps the hosts, for `run` and `ps`).
Used by the cluster tests and bench/fleet.py."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from godwit.lab.etcd import EtcdCluster
from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed

REGISTERED = "registered in etcd as"  # the agent's log line once it has joined
REGISTER_TIMEOUT_S = 30


@contextlib.contextmanager
def cluster_testbed(hosts: list[str], prefix: str, *,
                    members: int = 1) -> Iterator[tuple[Testbed, EtcdCluster]]:
    """`with cluster_testbed(["a", "b"], "gwx") as (bed, etcd):` — everything goes at exit."""
    with Testbed(hosts, prefix=prefix, subnet=pick_free_subnet()) as bed, \
            EtcdCluster(bed.ca, size=members, address=bed.net.gateway, prefix=prefix) as etcd:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda host: restart_in_cluster(bed, etcd, host), bed.names))
        config = json.loads(bed.config_path.read_text())
        bed.config_path.write_text(json.dumps({**config, "etcd": etcd.urls}))
        yield bed, etcd


def restart_in_cluster(bed: Testbed, etcd: EtcdCluster, host: str, **env: str) -> None:
    """(Re)start a host's agent in cluster mode; `env` is added to its environment."""
    bed.stop_agent(host)
    start_in_cluster(bed, etcd, host, **env)


def start_in_cluster(bed: Testbed, etcd: EtcdCluster, host: str,
                     **env: str) -> subprocess.Popen:
    """Start a host's agent in cluster mode, returned once it is registered in etcd: it
    answers /v1/info before it joins, so `godwit hosts` could still miss it."""
    registered = bed.agent_log(host).count(REGISTERED)
    proc = bed.start_agent(host, "--etcd", etcd.urls, env=env or None)
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while bed.agent_log(host).count(REGISTERED) <= registered:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"agent {host} did not register in etcd: "
                               f"{bed.agent_log(host)[-500:]}")
        time.sleep(0.05)
    return proc
