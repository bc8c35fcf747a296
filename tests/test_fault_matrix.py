"""Issue 13's fault matrix: one fault per case, injected into a real migration a → b of a
TCP server that a client on a third host keeps busy (a request every 10 ms on one
connection). Every case ends with exactly one running copy (`godwit ps` of every host and
runc's state agree), the report's result and error as documented, the client's stream
intact or cleanly reset (said per case), and nothing of the container left on the losing
side (no runc container, staging dir, journal or netns).

Timings come from `pause` fault points (godwit.faults: the step waits 3 s, its CRIU
stopped meanwhile), so a partition, a full disk or a killed CRIU lands inside the step on
purpose, not by a race. Deadlines are short: fence 5 s, freeze 6 s, progress 3 s."""

from __future__ import annotations

import itertools
import signal
import socket
from collections.abc import Iterator

import pytest
from conftest import copies, wait_for
from faultmatrix import (
    COMMIT_TIMEOUT_S,
    MAX_FREEZE_S,
    NAME,
    PROGRESS_TIMEOUT_S,
    AgentLog,
    Migration,
    Partition,
    assert_cleanly_reset,
    assert_intact,
    assert_intact_or_cleanly_reset,
    assert_nothing_left,
    assert_one_copy,
    assert_serves_new_connections,
    faulty_agent,
    fill,
    kill_stopped_criu,
    runc_names,
    small_disk,
)
from netclient import Client

from godwit.faults import STAGES
from godwit.lab.netns import TestHost
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import netserver_bundle
from godwit.migration.source import FENCE_MARGIN_S, FREEZE_MARGIN_S

pytestmark = [pytest.mark.integration, pytest.mark.faults]
RESUMED = "running on a (resumed)"
NEVER_FROZEN = "running on a (never frozen)"
BUNDLES = itertools.count()


@pytest.fixture(scope="module")
def client_host(bed: Testbed) -> TestHost:
    return bed.net.add_host("cl")


@pytest.fixture
def client(bed: Testbed, client_host: TestHost) -> Iterator[Client]:
    """The server container on a, with its own address, and its client (50 replies in)."""
    address = str(list(bed.net.subnet.hosts())[200])
    bundle = netserver_bundle(bed.bundle_dir(f"{NAME}-{next(BUNDLES)}"))
    started = bed.godwit("run", NAME, "--bundle", str(bundle), "--host", "a",
                         "--ip", f"{address}/{bed.net.subnet.prefixlen}",
                         "--gateway", bed.net.gateway)
    assert started.returncode == 0, started.stderr
    client = Client(client_host, address, socket.SOCK_STREAM)
    client.server = address
    try:
        client.wait_replies(50)
        yield client
    finally:
        client.close()
        for host in ("a", "b"):
            bed.godwit("rm", NAME, "--host", host)
        for host in ("a", "b"):
            wait_for(lambda h=host: NAME not in runc_names(bed, h), what="srv removed")


def assert_failed(report: dict, error: str, outcome: str = RESUMED) -> None:
    assert report["result"] == "failed", report
    assert error in report["error"], report
    assert report["outcome"] == outcome, report


# link partition: host b's veth on the hosts' segment goes down


def test_partition_before_the_freeze(bed: Testbed, client: Client) -> None:
    """b is cut off while the rootfs crosses (nothing frozen yet): the progress timeout
    ends the migration, the container never stopped. b drops its staging area when the
    source has been silent for its idle timeout. Stream: intact (never frozen)."""
    with faulty_agent(bed, "b", "rootfs:pause"), Partition(bed, "b") as link:
        link.heal()
        log = AgentLog(bed, "b")
        migration = Migration(bed)
        log.wait("fault injected at rootfs: pause", migration)
        link.cut()
        report = migration.report()
    assert_failed(report, f"no progress for {PROGRESS_TIMEOUT_S} s during rootfs",
                  NEVER_FROZEN)
    assert_one_copy(bed, "a")
    assert_intact(client)
    assert_nothing_left(bed, "b", timeout=PROGRESS_TIMEOUT_S + MAX_FREEZE_S + 10)


def test_partition_during_the_image_transfer(bed: Testbed, client: Client) -> None:
    """b is cut off while the images cross, the source frozen: the freeze deadline ends
    it and a resumes; b drops the address it had taken over and its staging area. Stream:
    intact (the client's requests held at b are lost with b's netns and sent again). The
    images are the restore request's body (protocol 2.6): a has sent them all, and waits
    for the restore, when b stops taking them in."""
    with faulty_agent(bed, "b", "images:pause"), Partition(bed, "b") as link:
        link.heal()
        log = AgentLog(bed, "b")
        migration = Migration(bed)
        log.wait("fault injected at images: pause", migration)
        link.cut()
        report = migration.report()
    assert_failed(report, f"freeze deadline of {MAX_FREEZE_S} s passed during restore")
    assert [p["name"] for p in report["phases"]][-2:] == ["images", "restore"], report
    assert report["downtime_s"] <= MAX_FREEZE_S + FREEZE_MARGIN_S
    assert_one_copy(bed, "a")
    assert_intact(client)
    assert_nothing_left(bed, "b")


def test_partition_during_the_restore(bed: Testbed, client: Client) -> None:
    """b is cut off while its CRIU restores: b's copy comes up, unreachable, and its fence
    kills it; a cannot learn that, so it waits for the fence deadline, then resumes.
    Stream: intact (b's copy ran cut off from the client too, so nothing it did reached
    the client; a cannot know whether it did, and keeps the connections: see README)."""
    with faulty_agent(bed, "b", "restore:pause"), Partition(bed, "b") as link:
        link.heal()
        log = AgentLog(bed, "b")
        migration = Migration(bed)
        log.wait("fault injected at restore: pause", migration)
        link.cut()
        report = migration.report()
    assert_failed(report, f"freeze deadline of {MAX_FREEZE_S} s passed during restore")
    assert report["downtime_s"] <= MAX_FREEZE_S + COMMIT_TIMEOUT_S + FENCE_MARGIN_S
    assert_one_copy(bed, "a")
    assert_intact(client)
    assert_nothing_left(bed, "b")


def test_partition_after_the_commit_destination_committed(bed: Testbed,
                                                          client: Client) -> None:
    """b is cut off while it takes the commit (it commits, the answer is lost): a cannot
    decide, the migration ends in-doubt with a paused. Operator path: heal, `godwit ps`
    shows b running, `godwit rm srv --host a`. Stream: intact (b carries on)."""
    with faulty_agent(bed, "b", "commit:pause"), Partition(bed, "b") as link:
        link.heal()
        log = AgentLog(bed, "b")
        # b's fence runs from its restore: the commit must land within it after the 3 s
        # pause, whatever the restore took on a loaded machine
        migration = Migration(bed, "--commit-timeout", str(3 * COMMIT_TIMEOUT_S))
        log.wait("fault injected at commit: pause", migration)
        link.cut()
        report = migration.report()
        assert report["result"] == "in-doubt", report
        assert "godwit resume srv` or `godwit rm srv" in report["outcome"], report
        link.heal()
        assert sorted(copies(bed, NAME)) == [("a", "paused"), ("b", "running")]
        refused = bed.godwit("migrate", NAME, "--to", "b", "--from", "a")
        assert refused.returncode != 0 and "ended in doubt" in refused.stderr
        removed = bed.godwit("rm", NAME, "--host", "a")
        assert removed.returncode == 0, removed.stderr
        assert_one_copy(bed, "b")
    assert_intact(client)
    assert_nothing_left(bed, "a")


def test_partition_after_the_commit_destination_fenced(bed: Testbed, client: Client) -> None:
    """b is cut off just before the commit reaches it: its fence kills its copy, a ends
    in-doubt, paused. Operator path: heal, `godwit ps` shows no copy on b,
    `godwit resume srv`. Stream: cleanly reset (b answered the client before the
    partition; the resumed copy's connection is older, so resume resets it)."""
    with faulty_agent(bed, "a", "commit:pause"), Partition(bed, "b") as link:
        link.heal()
        log = AgentLog(bed, "a")
        migration = Migration(bed)
        log.wait("fault injected at commit: pause", migration)
        link.cut()
        report = migration.report()
        assert report["result"] == "in-doubt", report
        link.heal()
        assert copies(bed, NAME) == [("a", "paused")]
        resumed = bed.godwit("resume", NAME)
        assert resumed.returncode == 0, resumed.stderr
        assert_one_copy(bed, "a")
    assert_cleanly_reset(client)
    assert_nothing_left(bed, "b")
    assert not list((bed.host("a").state_dir / "outgoing").glob("*")), "journal settled"


# destination disk full (b's state dir on a small tmpfs, filled during the step)


@pytest.mark.parametrize(("stage", "error", "outcome"), [
    ("rootfs", "rootfs transfer failed", NEVER_FROZEN),
    ("images", "images transfer failed", RESUMED),
])
def test_destination_disk_full(bed: Testbed, client: Client, stage: str, error: str,
                               outcome: str) -> None:
    """b's disk fills up while the rootfs (nothing frozen yet) or the images (frozen)
    cross: b refuses with ENOSPC, a rolls back. Stream: intact."""
    with small_disk(bed, "b") as disk, faulty_agent(bed, "b", f"{stage}:pause"):
        log = AgentLog(bed, "b")
        migration = Migration(bed, "--progress-timeout", "20")  # outlasts the pause
        log.wait(f"fault injected at {stage}: pause", migration)
        fill(disk)
        report = migration.report()
        assert_failed(report, error, outcome)
        assert "No space left on device" in report["error"], report
        assert_one_copy(bed, "a")
        assert_nothing_left(bed, "b")
        (disk / "filler").unlink()
    assert_intact(client)


def test_image_corrupted_in_transit(bed: Testbed, client: Client) -> None:
    """One bit of an image file flips on the wire after the source took its digest: b
    refuses the file, a resumes. Stream: intact."""
    with faulty_agent(bed, "a", "images:corrupt"):
        report = Migration(bed).report()
    assert_failed(report, "images transfer failed")
    assert "blake3 mismatch" in report["error"], report
    assert_one_copy(bed, "a")
    assert_intact(client)
    assert_nothing_left(bed, "b")


# CRIU killed (SIGKILL) while a pause fault point holds it stopped in its step


def test_criu_killed_mid_dump(bed: Testbed, client: Client, client_host: TestHost) -> None:
    """a's dump CRIU is killed once it has seized the tasks: runc reports the dump failed,
    a resumes, and serves new connections. Stream: intact when CRIU was killed before its
    parasite put the connection in TCP repair mode, else cleanly reset (CRIU's cleanup
    never ran: that socket cannot carry on). Which one depends on how far CRIU got in
    the few milliseconds before the pause stopped it; both are checked strictly."""
    with faulty_agent(bed, "a", "dump:pause"):
        migration = Migration(bed)
        kill_stopped_criu(bed, "a", migration)
        report = migration.report()
    assert_failed(report, "dump failed")
    assert_one_copy(bed, "a")
    assert_intact_or_cleanly_reset(client)
    assert_serves_new_connections(client_host, client.server)
    assert_nothing_left(bed, "b")


def test_criu_killed_mid_restore(bed: Testbed, client: Client) -> None:
    """b's restore CRIU is killed: b discards the partial copy and says so, a resumes.
    Stream: intact (no copy ran on b)."""
    with faulty_agent(bed, "b", "restore:pause"):
        migration = Migration(bed)
        kill_stopped_criu(bed, "b", migration)
        report = migration.report()
    assert_failed(report, "restore failed on b")
    assert_one_copy(bed, "a")
    assert_intact(client)
    assert_nothing_left(bed, "b")


# agents restarted


# commit-done is the destination's stage; at departure the migration has ended
@pytest.mark.parametrize("stage", [s for s in STAGES if s not in ("commit-done", "departure")])
def test_source_agent_restarted_at(bed: Testbed, client: Client, stage: str) -> None:
    """a's agent dies (os._exit, as SIGKILL) at a journal stage and starts again: it
    settles the migration from its journal, aborting b and resuming the container.
    Stream: intact, except at `verify` and `commit` (b's restored copy had answered the
    client: the resumed copy's connection is reset)."""
    with faulty_agent(bed, "a", f"{stage}:crash"):
        result = Migration(bed).result()
        assert result.returncode != 0
    recovered = wait_for(lambda: _settled_report(bed), timeout=30, what="a's recovery")
    assert_one_copy(bed, "a")
    if stage != "prepare":  # nothing had started on b: no journal, nothing to settle
        assert recovered["result"] == "failed", recovered
        assert "restarted during the migration" in recovered["error"]
    if stage in ("verify", "commit"):  # b's restored copy had answered the client
        assert_cleanly_reset(client)
    else:
        assert_intact(client)
    assert_nothing_left(bed, "b")
    assert not list((bed.host("a").state_dir / "outgoing").glob("*"))


def _settled_report(bed: Testbed) -> dict | None:
    """The newest migration report of srv, once no migration of it is under way."""
    history = [r for r in bed_history(bed) if r["container"] == NAME]
    if not history or history[-1]["result"] == "running":
        return None
    if list((bed.host("a").state_dir / "outgoing").glob("*/journal.json")):
        return None
    return history[-1]


def bed_history(bed: Testbed) -> list[dict]:
    import json

    result = bed.godwit("history", "--json", "--host", "a")
    return json.loads(result.stdout) if result.returncode == 0 else []


def test_destination_agent_restarted_before_the_commit(bed: Testbed, client: Client) -> None:
    """b's agent is killed after its restore, before the commit (a pauses before verifying
    the restored copy): a cannot verify, waits for b's fence deadline (nothing else tells
    that no copy runs there) and resumes; b's fence has killed the copy; b's agent, started
    again, drops what was left. Stream: cleanly reset (b's copy had answered the client)."""
    with faulty_agent(bed, "a", "verify:pause"):
        log = AgentLog(bed, "a")
        migration = Migration(bed)
        log.wait("fault injected at verify: pause", migration)
        bed.stop_agent("b", signal.SIGKILL)
        report = migration.report()
        assert NAME not in runc_names(bed, "b"), "b's fence killed its copy"
        bed.start_agent("b")
    assert_failed(report, "cannot connect")
    assert report["downtime_s"] <= COMMIT_TIMEOUT_S + FENCE_MARGIN_S + 3
    assert_one_copy(bed, "a")
    assert_cleanly_reset(client)
    assert_nothing_left(bed, "b")
