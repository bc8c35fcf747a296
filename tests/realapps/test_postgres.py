"""PostgreSQL 15 (Debian's, as its own non-root user postgres) migrated a → b while pgbench
runs TPC-B transactions on four connections from host c; no transaction fails, no
connection drops, and the database's own invariants hold afterwards."""

from __future__ import annotations

import re
import signal
from pathlib import Path

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
    processes,
    record,
    remove,
    run_client,
    start,
    start_client,
    user_ids,
)
from .rootfs import PG_BIN, PG_DATA

pytestmark = [pytest.mark.integration, pytest.mark.realapps]
CLIENTS = 4
SCALE = 1


def psql(app: App, host: TestHost, query: str) -> list[str]:
    """Run ``query`` with the host's psql; rows of ``|``-separated fields."""
    result = run_client(app.bed, host, ["psql", "-h", app.address, "-U", "postgres", "-At",
                                        "-v", "ON_ERROR_STOP=1", "-c", query, "postgres"])
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


def pgbench(cached_rootfs: Path, app: App, *args: str) -> list[str]:
    """pgbench from the cached rootfs (Debian ships it with the server, not the client)."""
    return ["chroot", str(cached_rootfs), f"{PG_BIN}/pgbench", "-h", app.address,
            "-U", "postgres", *args, "postgres"]


def ready(app: App, host: TestHost) -> bool:
    result = run_client(app.bed, host, ["psql", "-h", app.address, "-U", "postgres", "-At",
                                        "-c", "select 1", "postgres"], timeout=10)
    return result.stdout.strip() == b"1"


def history_rows(app: App, host: TestHost) -> int:
    """Committed TPC-B transactions so far: each adds a pgbench_history row."""
    return int(psql(app, host, "select count(*) from pgbench_history")[0])


def tpcb_invariants(app: App, host: TestHost) -> tuple[list[str], list[str]]:
    """(balance sums of accounts, branches, tellers and history deltas; row counts)."""
    sums = psql(app, host, "select (select sum(abalance) from pgbench_accounts), "
                           "(select sum(bbalance) from pgbench_branches), "
                           "(select sum(tbalance) from pgbench_tellers), "
                           "(select sum(delta) from pgbench_history)")[0].split("|")
    counts = psql(app, host, "select (select count(*) from pgbench_accounts), "
                             "(select count(*) from pgbench_branches), "
                             "(select count(*) from pgbench_tellers), "
                             "(select count(*) from pgbench_history)")[0].split("|")
    return sums, counts


@pytest.fixture
def postgres(bed: Testbed, app_rootfs: Path, client_host: TestHost):
    bundle = new_bundle(bed, "ra-postgres", app_rootfs)
    uid, gid, groups = user_ids(bundle / "rootfs", "postgres")
    config = oci_config([f"{PG_BIN}/postgres", "-D", PG_DATA], hostname="postgres",
                        env={"HOME": "/var/lib/postgresql"}, uid=uid, gid=gid,
                        additional_gids=groups, capabilities=[])
    app = start(bed, "ra-postgres", bundle, config, 203)
    yield app
    remove(app)


@pytest.mark.parametrize(("strategy", "shared"), MIGRATIONS, ids=MIGRATION_IDS)
def test_postgres_under_pgbench(bed: Testbed, client_host: TestHost, app_rootfs: Path,
                                postgres: App, strategy: str, shared: bool) -> None:
    wait_for(lambda: ready(postgres, client_host), timeout=60, what="postgres to accept")
    init = run_client(bed, client_host, pgbench(app_rootfs, postgres, "-i", "-q",
                                                "-s", str(SCALE)))
    assert init.returncode == 0, init.stderr.decode()
    # -T: longer than the run. SIGALRM is pgbench's own end-of-run timer: it stops there and
    # reports as if the time were up, after the move.
    bench = start_client(bed, client_host, pgbench(
        app_rootfs, postgres, "-T", "600", "-c", str(CLIENTS), "-j", "2"), "pgbench")
    report = migrate_under_load(postgres, bench, strategy, shared)
    if strategy == "stop-and-copy":  # shared buffers and System V segment: to b's page server
        assert "streamed during the dump" in report.get("pages", ""), report
    clients = psql(postgres, client_host, "select application_name from pg_stat_activity "
                                          "where backend_type = 'client backend'")
    assert clients.count("pgbench") == CLIENTS, \
        f"a pgbench connection was dropped: {clients}; pgbench: {bench.output()}"
    done = history_rows(postgres, client_host)
    wait_for(lambda: history_rows(postgres, client_host) > done + 100,
             what="pgbench to go on, on b")
    code, out, err = bench.stop(signal.SIGALRM)
    assert code == 0 and "aborted" not in err, err
    assert re.search(r"^number of failed transactions: 0 ", out, re.M), out
    processed = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    assert processed and int(processed.group(1)) > 0, out
    sums, counts = tpcb_invariants(postgres, client_host)
    assert len(set(sums)) == 1, f"TPC-B balances disagree: {sums}"
    assert counts == [str(100000 * SCALE), str(SCALE), str(10 * SCALE), processed.group(1)]
    uid, _gid, groups = user_ids(postgres.rootfs, "postgres")
    procs = processes(postgres)
    assert {p.uid for p in procs} == {uid} and len(procs) > 4, procs
    assert all(set(groups) <= set(p.gids) for p in procs), procs
    record(postgres, report, shared, transactions=int(processed.group(1)))
