"""Helpers of the fault matrix (tests/test_fault_matrix.py): a served TCP client, faulty
agents, a link partition, a full disk, CRIU found and killed, and the checks every case
ends with (one copy, nothing left on the losing side)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from conftest import copies, wait_for
from netclient import Client

from godwit import network, procfs
from godwit.api import DEFAULT_PORT
from godwit.lab.netns import TestHost
from godwit.lab.testbed import Testbed
from godwit.runc import DEFAULT_RUNC

NAME = "srv"
COMMIT_TIMEOUT_S = 5  # the fence: an uncommitted destination copy lives this long
MAX_FREEZE_S = 6
PROGRESS_TIMEOUT_S = 3
OPTIONS = ("--strategy", "stop-and-copy", "--commit-timeout", str(COMMIT_TIMEOUT_S),
           "--max-freeze", str(MAX_FREEZE_S), "--progress-timeout", str(PROGRESS_TIMEOUT_S))
RECOVERY_S = 40  # a client's TCP retransmission back-off after a long freeze is seconds


class Migration:
    """`godwit migrate srv --to b` run in the background; `report()` waits for it."""

    def __init__(self, bed: Testbed, *extra: str) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self.future = pool.submit(bed.godwit, "migrate", NAME, "--to", "b", "--json",
                                  *OPTIONS, *extra, timeout=120)
        pool.shutdown(wait=False)

    def result(self) -> subprocess.CompletedProcess:
        return self.future.result(timeout=130)

    def report(self) -> dict:
        result = self.result()
        try:
            return json.loads(result.stdout)
        except ValueError as exc:
            raise AssertionError(f"no report: {result.stdout}{result.stderr}") from exc


class AgentLog:
    """Waits for a line an agent logs from now on (a fault point reached)."""

    def __init__(self, bed: Testbed, host: str) -> None:
        self.bed, self.host = bed, host
        self.start = len(bed.agent_log(host))

    def wait(self, text: str, migration: Migration, timeout: float = 30) -> None:
        """Until the line comes; fails with what the migration and the agent said if the
        migration ends first or the line never comes."""
        with contextlib.suppress(AssertionError):  # timed out: said below
            wait_for(lambda: text in self.since() or migration.future.done(), timeout=timeout)
        if text not in self.since():
            ended = migration.result() if migration.future.done() else None
            raise AssertionError(
                f"{self.host} did not log {text!r} in {timeout} s; the migration "
                + (f"ended: {ended.stdout}{ended.stderr}" if ended else "runs on")
                + f"\n{self.host}'s log since:\n{self.since()[-4000:]}")

    def since(self) -> str:
        return self.bed.agent_log(self.host)[self.start:]


@contextlib.contextmanager
def faulty_agent(bed: Testbed, host: str, fault: str) -> Iterator[None]:
    """The host's agent runs with GODWIT_FAULT=fault, and without it afterwards."""
    bed.stop_agent(host)
    bed.start_agent(host, env={"GODWIT_FAULT": fault})
    try:
        yield
    finally:
        bed.stop_agent(host, signal.SIGKILL)
        bed.start_agent(host)


class Partition:
    """Cut a host off the hosts' segment: its veth (on the root bridge) goes down."""

    def __init__(self, bed: Testbed, host: str) -> None:
        self.address = bed.host(host).address
        self.veth = f"{bed.prefix}-v{self.address.rsplit('.', 1)[1]}"

    def __enter__(self) -> Partition:
        self.cut()
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()

    def cut(self) -> None:
        subprocess.run(["ip", "link", "set", self.veth, "down"], check=True)

    def heal(self) -> None:
        """Link up, and back once the host's agent answers from the root netns again."""
        subprocess.run(["ip", "link", "set", self.veth, "up"], check=True)
        wait_for(lambda: _connects(self.address, DEFAULT_PORT), what="the link back up")


def _connects(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=0.5).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def small_disk(bed: Testbed, host: str, size: str = "64m") -> Iterator[Path]:
    """The host's whole state dir on a tmpfs of `size` (its agent restarted on it)."""
    state = bed.host(host).state_dir
    bed.stop_agent(host)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "godwit-small", str(state)],
                   check=True)
    try:
        bed.host(host).runc_root.mkdir(parents=True, exist_ok=True)
        bed.start_agent(host)
        yield state
    finally:
        log = bed.agent_log(host)
        bed.stop_agent(host, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(state)], check=False)
        (state / "agent.log").open("a").write(log)
        bed.start_agent(host)


def fill(directory: Path, leave: int = 16 << 10) -> None:
    """Take all but `leave` bytes of the file system of `directory`."""
    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as filler:
        filler.truncate(0)
        subprocess.run(["fallocate", "-l", str(max(free - leave, 0)), filler.name], check=True)


def criu_of(bed: Testbed, host: str) -> list[int]:
    """Pids of the CRIU processes (with their helpers) that runcs of this host's runc
    root run."""
    root = str(bed.host(host).runc_root).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if root in cmdline.read_bytes().split(b"\0") and \
                    (cmdline.parent / "comm").read_text().strip() == "runc":
                found += [pid for pid in procfs.descendants(int(cmdline.parent.name))
                          if _comm(pid) == "criu"]
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "T"


def kill_stopped_criu(bed: Testbed, host: str, migration: Migration) -> list[int]:
    """SIGKILL the host's CRIU (with the helpers it forked) once a `pause` fault point has
    stopped it mid-step; fails with what the migration and the agent said if none was
    stopped within 30 s or the migration ended first."""
    with contextlib.suppress(AssertionError):  # said below, with the migration's outcome
        wait_for(lambda: migration.future.done()
                 or any(stopped(p) for p in criu_of(bed, host)), timeout=30)
    pids = criu_of(bed, host)
    if not any(stopped(p) for p in pids):
        ended = migration.result() if migration.future.done() else None
        raise AssertionError(
            f"no stopped CRIU on {host}; the migration "
            + (f"ended: {ended.stdout}{ended.stderr}" if ended else "runs on")
            + f"\n{host}'s log ends:\n{bed.agent_log(host)[-4000:]}")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def runc_names(bed: Testbed, host: str) -> list[str]:
    runc = subprocess.run([DEFAULT_RUNC, "--root", str(bed.host(host).runc_root), "list", "-q"],
                          capture_output=True, text=True, check=True)
    return runc.stdout.split()


def assert_one_copy(bed: Testbed, host: str, status: str = "running") -> None:
    """`godwit ps` of every host and runc's own state agree: one copy, on `host` (a
    departed copy is hidden at once, and deleted from runc in the background)."""
    assert copies(bed, NAME) == [(host, status)]
    wanted = {h: h == host for h in ("a", "b")}
    with contextlib.suppress(AssertionError):
        wait_for(lambda: {h: NAME in runc_names(bed, h) for h in wanted} == wanted,
                 timeout=10, what="runc's state")
    assert {h: NAME in runc_names(bed, h) for h in wanted} == wanted


def leftovers(bed: Testbed, host: str) -> list[str]:
    """What a host that lost the container still holds of it."""
    state = bed.host(host).state_dir
    found = [f"runc container {NAME}"] if NAME in runc_names(bed, host) else []
    found += [f"{p} ({_listing(p)})" for p in (state / "incoming").glob("*")]
    found += [str(p) for p in (state / "outgoing").glob("*")]
    found += [str(p) for p in [state / "containers" / NAME] if p.exists()]
    netns = network.netns_path(bed.host(host).netns, NAME)
    return found + ([str(netns)] if netns.exists() else [])


def _listing(staging: Path) -> str:
    decision = staging / "decision"
    said = decision.read_text() if decision.exists() else "no decision"
    return f"{said}: {' '.join(sorted(p.name for p in staging.iterdir()))}"


def assert_nothing_left(bed: Testbed, host: str, timeout: float = 20) -> None:
    """The losing side ends with no runc container, staging dir, journal or netns (some
    go at a deadline of their own: the fence, the destination's idle expiry)."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not leftovers(bed, host), timeout=timeout, what="no leftovers")
    assert leftovers(bed, host) == [], bed.agent_log(host)[-4000:]


def assert_intact(client: Client, more: int = 30) -> None:
    """The connection carried on: every request answered once, in order."""
    target = len(client.replies) + more
    wait_for(lambda: len(client.replies) >= target or client.errors, timeout=RECOVERY_S,
             what=f"{more} more replies")
    client.assert_stream_intact()


def assert_cleanly_reset(client: Client) -> None:
    """The connection ended with a reset the client saw at once (not a stall until its
    own timeout), and every reply before it was right."""
    wait_for(lambda: client.errors, timeout=RECOVERY_S, what="the client to see a reset")
    assert "ConnectionResetError" in client.errors[0], client.errors
    numbers = [n for _, n, _ in client.replies]
    assert numbers == list(range(1, len(numbers) + 1)), "a reply was lost or duplicated"
    assert all(n == count for _, n, count in client.replies)


def assert_intact_or_cleanly_reset(client: Client, more: int = 30) -> None:
    """Either of the two, strictly: more replies in order, or a reset seen at once."""
    target = len(client.replies) + more
    wait_for(lambda: len(client.replies) >= target or client.errors, timeout=RECOVERY_S,
             what=f"{more} more replies or a reset")
    if client.errors:
        assert_cleanly_reset(client)
    else:
        client.assert_stream_intact()


def assert_serves_new_connections(client_host: TestHost, server: str) -> None:
    """The resumed server takes a new connection and answers on it."""
    fresh = Client(client_host, server, socket.SOCK_STREAM)
    try:
        fresh.wait_replies(20)
    finally:
        fresh.close()
    fresh.assert_stream_intact()
