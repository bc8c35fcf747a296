"""nginx (Debian's, master as root, workers dropped to www-data) migrated a → b while wrk
loads a static file over keep-alive connections from host c; the file reads back intact
and nginx accepted no new connection (none was dropped)."""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.request

import pytest
from conftest import wait_for

from godwit import network
from godwit.bundle import DEFAULT_CAPS, oci_config
from godwit.lab.netns import TestHost
from godwit.lab.testbed import Testbed

from .harness import (
    MIGRATION_IDS,
    MIGRATIONS,
    App,
    migrate_under_load,
    new_bundle,
    processes,
    record,
    remove,
    start,
    start_client,
    user_ids,
)

pytestmark = [pytest.mark.integration, pytest.mark.realapps]
WRK_CONNECTIONS = 16
BLOB_BYTES = 16 * 1024
# What a server that starts as root and drops privileges needs (a subset of Docker's set).
NGINX_CAPS = [*DEFAULT_CAPS, "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_SETGID", "CAP_SETUID"]
NGINX_CONF = """\
user www-data;
worker_processes 2;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server {
        listen 80;
        root /var/www/realapps;
        location = /status { stub_status; }
    }
}
"""


def fetch(app: App, host: TestHost, path: str) -> bytes:
    """GET over a new connection from the client host."""
    def get() -> bytes:
        with urllib.request.urlopen(f"http://{app.address}{path}", timeout=5) as response:
            return response.read()

    return network.in_netns(host.netns, get)


class StatusPage:
    """nginx's stub_status, read from the client host; counts its own connections so that
    every other accepted connection is one of wrk's."""

    def __init__(self, app: App, host: TestHost) -> None:
        self.app, self.host, self.reads = app, host, 0

    def counters(self) -> tuple[int, int]:
        """(connections accepted, requests served), this read included."""
        self.reads += 1
        line = fetch(self.app, self.host, "/status").decode().splitlines()[2]
        accepts, _handled, requests = map(int, line.split())
        return accepts, requests

    def others_accepted(self) -> int:
        """Connections accepted that were not this page's reads."""
        return self.counters()[0] - self.reads

    def settled_others(self, at_least: int) -> int:
        """Other connections accepted once at least ``at_least``, unchanged for 0.5 s (else 0)."""
        first = self.others_accepted()
        time.sleep(0.5)
        return first if first >= at_least and self.others_accepted() == first else 0

    def ready(self) -> bool:
        try:
            self.counters()
        except OSError:
            self.reads -= 1  # refused: nginx accepted nothing
            return False
        return True


def requests_done(output: str) -> int:
    return int(re.search(r"(\d+) requests in", output).group(1))


@pytest.fixture
def nginx(bed: Testbed, app_rootfs, client_host: TestHost):
    bundle = new_bundle(bed, "ra-nginx", app_rootfs)
    rootfs = bundle / "rootfs"
    (rootfs / "etc/nginx/nginx.conf").write_text(NGINX_CONF)
    (rootfs / "var/www/realapps").mkdir(parents=True)
    (rootfs / "var/www/realapps/blob.bin").write_bytes(os.urandom(BLOB_BYTES))
    config = oci_config(["nginx", "-g", "daemon off;"], hostname="nginx",
                        capabilities=NGINX_CAPS)
    app = start(bed, "ra-nginx", bundle, config, 202)
    yield app
    remove(app)


@pytest.mark.parametrize(("strategy", "shared"), MIGRATIONS, ids=MIGRATION_IDS)
def test_nginx_under_wrk(bed: Testbed, client_host: TestHost, nginx: App,
                         strategy: str, shared: bool) -> None:
    page = StatusPage(nginx, client_host)
    wait_for(page.ready, timeout=30, what="nginx to answer")
    blob = (nginx.rootfs / "var/www/realapps/blob.bin").read_bytes()
    www_data = user_ids(nginx.rootfs, "www-data")[0]
    # -d: longer than the run; wrk prints its totals when interrupted, after the move.
    wrk = start_client(bed, client_host, [
        "wrk", "-t2", f"-c{WRK_CONNECTIONS}", "-d600s", "--timeout", "10s",
        f"http://{nginx.address}/blob.bin"], "wrk")
    # wrk opens one connection more than -c (a first one it closes): count them before.
    connections = wait_for(lambda: page.settled_others(WRK_CONNECTIONS), what="wrk to connect")
    report = migrate_under_load(nginx, wrk, strategy, shared)
    served = page.counters()[1]
    wait_for(lambda: page.counters()[1] > served + 100, what="wrk to go on, on b")
    code, out, err = wrk.stop()
    assert code == 0, err
    assert "Socket errors" not in out and "Non-2xx" not in out, out
    assert requests_done(out) > 0, out
    assert page.others_accepted() == connections, "wrk reconnected: a connection dropped"
    assert hashlib.sha256(fetch(nginx, client_host, "/blob.bin")).digest() == \
        hashlib.sha256(blob).digest()
    procs = processes(nginx)
    assert procs[0].uid == 0 and procs[0].comm == "nginx", procs
    assert [p.uid for p in procs[1:]] == [www_data, www_data], procs
    record(nginx, report, shared, requests=requests_done(out))
