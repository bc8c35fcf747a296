"""Redis (Debian's redis-server, as root) migrated a → b while redis-benchmark hammers it
over keep-alive connections from host c; the keys written before the move read back."""

from __future__ import annotations

import hashlib

import pytest
from conftest import wait_for

from godwit.bundle import oci_config
from godwit.lab.netns import TestHost
from godwit.lab.testbed import Testbed

from .harness import (
    MIGRATION_IDS,
    MIGRATIONS,
    App,
    migrate_under_load,
    new_bundle,
    record,
    remove,
    run_client,
    start,
    start_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.realapps]
KEYS = 20000
BENCH_CLIENTS = 16
REDIS_ARGS = ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
              "--appendonly", "no", "--dir", "/tmp", "--logfile", ""]


def value_of(i: int) -> str:
    return f"{i}:" + hashlib.sha256(str(i).encode()).hexdigest() * 8


def cli(app: App, host: TestHost, *args: str, stdin: bytes = b"") -> str:
    result = run_client(app.bed, host, ["redis-cli", "-h", app.address, *args], stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def info(app: App, host: TestHost) -> dict[str, str]:
    lines = cli(app, host, "INFO").splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def write_keys(app: App, host: TestHost) -> None:
    """SET realapps:<i> for every i, through redis-cli --pipe (RESP on its stdin)."""
    def resp(*words: str) -> str:
        return f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)

    payload = "".join(resp("SET", f"realapps:{i}", value_of(i)) for i in range(KEYS))
    out = cli(app, host, "--pipe", stdin=payload.encode())
    assert f"errors: 0, replies: {KEYS}" in out, out


def read_keys(app: App, host: TestHost) -> list[str]:
    """GET every key back in MGETs of 500, through redis-cli."""
    commands = "".join("MGET " + " ".join(f"realapps:{i}" for i in range(s, s + 500)) + "\n"
                       for s in range(0, KEYS, 500))
    return cli(app, host, stdin=commands.encode()).splitlines()


def ready(app: App, host: TestHost) -> bool:
    result = run_client(app.bed, host, ["redis-cli", "-h", app.address, "PING"], timeout=5)
    return result.stdout.strip() == b"PONG"


@pytest.fixture
def redis(bed: Testbed, app_rootfs, client_host: TestHost):
    bundle = new_bundle(bed, "ra-redis", app_rootfs)
    app = start(bed, "ra-redis", bundle, oci_config(REDIS_ARGS, hostname="redis"), 201)
    yield app
    remove(app)


@pytest.mark.parametrize(("strategy", "shared"), MIGRATIONS, ids=MIGRATION_IDS)
def test_redis_under_benchmark(bed: Testbed, client_host: TestHost, redis: App,
                               strategy: str, shared: bool) -> None:
    wait_for(lambda: ready(redis, client_host), timeout=30, what="redis to answer PING")
    write_keys(redis, client_host)
    # -n: far more requests than the run can make; it ends at SIGINT, after the move.
    bench = start_client(bed, client_host, [
        "redis-benchmark", "-h", redis.address, "-c", str(BENCH_CLIENTS), "-n", "1000000000",
        "-t", "set", "-r", "50000", "-d", "128", "-k", "1"], "redis-benchmark")
    wait_for(lambda: int(info(redis, client_host)["connected_clients"]) > BENCH_CLIENTS,
             what="redis-benchmark to connect")
    accepted = int(info(redis, client_host)["total_connections_received"])
    report = migrate_under_load(redis, bench, strategy, shared)
    after = info(redis, client_host)
    assert int(after["connected_clients"]) == BENCH_CLIENTS + 1, "a connection was dropped"
    assert int(after["total_connections_received"]) == accepted + 1, "a client reconnected"
    wait_for(lambda: int(info(redis, client_host)["total_commands_processed"])
             > int(after["total_commands_processed"]) + 1000, what="load to go on, on b")
    code, out, err = bench.stop()
    assert "rror" not in err + out, err
    assert code == -2, f"redis-benchmark ended by itself ({code}): {err}"
    assert read_keys(redis, client_host) == [value_of(i) for i in range(KEYS)]
    record(redis, report, shared)
