"""A fixed, representative subset of CRIU's zdtm static tests through a godwit migration.

Each test runs once without a migration (control) and once per strategy, migrated a → b,
then stopped with SIGTERM; it must report PASS after the migration whenever it did in the
control run. The full selection is the benchmark bench/zdtm.py (docs/zdtm.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from zdtm_harness import RunResult, Variant, run_test
from zdtm_suite import ZdtmTest, build, load_tests

from godwit.lab.testbed import Testbed

pytestmark = [pytest.mark.integration, pytest.mark.conformance]

SUBSET = [
    "pipe00",          # pipes with data in flight
    "sockets00",       # unix stream sockets, a bound socket file (suid)
    "socket_listen",   # a listening TCP socket
    "socket_udp",      # UDP sockets with queued datagrams
    "shm",             # System V shared memory
    "posix_timers",    # armed POSIX timers
    "sigpending",      # pending and queued signals
    "inotify01",       # inotify watches
    "zombie00",        # zombies with exit codes
    "pthread00",       # a thread group
    "file_shared",     # a shared file mapping
    "stopped01",       # a task in stopped state (SIGSTOP) inside the frozen cgroup
    "tempfs_ro",       # a read-only tmpfs holding a file (CRIU patches 0004 + 0009)
    "netns_sub_veth",  # a veth to a netns nested in the container (carried with it)
]
STRATEGIES = ["stop-and-copy", "post-copy"]


@pytest.fixture(scope="module")
def zdtm() -> dict[str, ZdtmTest]:
    test_dir = build()
    return {"dir": test_dir, **{t.name: t for t in load_tests(test_dir, SUBSET)}}


@pytest.fixture(scope="module")
def controls(bed: Testbed, zdtm: dict, tmp_path_factory) -> dict[str, RunResult]:
    logs = tmp_path_factory.mktemp("zdtm-logs")
    return {name: run_test(bed, zdtm[name], zdtm["dir"], Variant(), name=f"ctl-{i}",
                           logs_dir=logs)
            for i, name in enumerate(SUBSET)}


def describe(result: RunResult) -> str:
    return (f"{result.verdict} at {result.step}: {result.reason}\nmigration: {result.migration}"
            f"\n.out: {result.out_tail}\nlogs: {result.logs}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", SUBSET)
def test_zdtm_through_migration(bed: Testbed, zdtm: dict, controls: dict, name: str,
                                strategy: str, tmp_path: Path) -> None:
    control = controls[name]
    if control.verdict != "pass":
        pytest.skip(f"control run {describe(control)}")
    result = run_test(bed, zdtm[name], zdtm["dir"], Variant(strategy),
                      name=f"{name[:20]}-{STRATEGIES.index(strategy)}", logs_dir=tmp_path)
    assert result.migration and result.migration["result"] == "ok", describe(result)
    assert result.verdict == "pass", describe(result)
