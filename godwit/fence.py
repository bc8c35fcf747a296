"""Fencing of a restored-but-uncommitted container, independent of the agent process.

Before a destination restores a container it writes a decision file reading `pending`
and starts this watchdog in its own session, or arms one it started ahead (`Standby`).
Whoever changes the decision first wins, under an exclusive flock: the agent's commit
writes `committed`, an abort writes `aborted`, the watchdog at the deadline writes
`fenced` and deletes the container (the `DestinationState`s a fence decides; before the
restore the receiver keeps its own states in the same file). So a destination copy runs
for good only if the source heard it was committed, even when the destination agent dies
between restore and commit.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from godwit.migration.states import DestinationState

STANDBY = "--standby"  # argv: started before the restore, armed through stdin
GO = b"g"


def read_decision(path: Path) -> DestinationState:
    """The decision; a missing or unreadable one is no commit: aborted."""
    try:
        return DestinationState(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return DestinationState.ABORTED


def decide(path: Path, new: DestinationState) -> DestinationState:
    """Move `pending` to `new` atomically; return the decision that holds afterwards."""
    with open(path, "r+") as f:
        return _decide(f, new)


def _decide(f: IO[str], new: DestinationState) -> DestinationState:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        current = _read(f)
        if current != DestinationState.PENDING:
            return current or DestinationState.ABORTED
        f.seek(0)
        f.truncate()
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
        return new
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def _read(f: IO[str]) -> DestinationState | None:
    """The decision; None for a file caught half rewritten (read without the lock)."""
    f.seek(0)
    try:
        return DestinationState(f.read().strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class FenceOrder:
    """What a watchdog fences: the copy `name` of runc (binary, root) `runc`, unless
    `decision` reads committed `seconds` after its clock starts. With `netns_id`, the
    container's netns is deleted (isolating it) before the container is killed. With
    `cluster` (cluster mode: ClusterMigrations.fence_args), an undecided copy at the
    deadline lives or dies by the decision in etcd."""

    decision: Path
    seconds: float
    runc: tuple[str, Path]
    name: str
    container_dir: Path
    netns_id: str | None = None
    cluster: list[str] | None = None

    def argv(self, standby: bool) -> list[str]:
        return [sys.executable, "-m", "godwit.fence", *([STANDBY] if standby else []),
                str(self.decision), str(self.seconds), self.runc[0], str(self.runc[1]),
                self.name, str(self.container_dir), self.netns_id or "",
                *(self.cluster or [])]


def start_watchdog(order: FenceOrder) -> None:
    """Arm a watchdog now; it outlives the agent. Its start (~70 ms of CPU for Python) is
    better paid before a freeze: see Standby."""
    _arm(order.decision)
    _spawn(order.argv(standby=False), stdin=subprocess.DEVNULL)


class Standby:
    """A watchdog started ahead of the freeze with its clock stopped. `arm()`, at the
    restore, only writes `pending` and a byte down its pipe. Without that byte (the
    migration ended before a restore, or the agent died: the pipe closes) it exits."""

    def __init__(self, order: FenceOrder) -> None:
        self.order = order
        read_end, self.go = os.pipe()  # the write end is not inherited by other children
        try:
            self.process = _spawn(order.argv(standby=True), stdin=read_end)
        except BaseException:
            os.close(self.go)
            raise
        finally:
            os.close(read_end)

    def arm(self) -> None:
        """Start the clock; a standby that died meanwhile is replaced by a new watchdog."""
        _arm(self.order.decision)
        try:
            os.write(self.go, GO)
        except BrokenPipeError:
            _spawn(self.order.argv(standby=False), stdin=subprocess.DEVNULL)
        finally:
            self.close()

    def close(self) -> None:
        """No restore will come: the standby exits."""
        if self.go >= 0:
            os.close(self.go)
            self.go = -1


def _arm(decision: Path) -> None:
    decision.write_text(DestinationState.PENDING)  # in the freeze: no fsync (only a crash
    # of the host loses it, and that ends the restored copy too)


def _spawn(argv: list[str], stdin: int) -> subprocess.Popen:
    return subprocess.Popen(argv, start_new_session=True, close_fds=True, stdin=stdin,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watchdog(decision: Path, seconds: float, runc: str, runc_root: Path, name: str,
             container_dir: Path, netns_id: str = "", cluster: list[str] | None = None) -> None:
    """Sleep until the deadline; fence the container unless it was committed. An aborted
    copy is killed here too, in case the agent's own kill failed (killing is idempotent)."""
    settle = None
    if cluster:

        def settle() -> DestinationState:
            # imported only now: the decision file must be opened first (gRPC takes a
            # while to import, and a committed migration's staging area goes at once)
            from godwit.cluster.migration_hooks import settle_fence

            held = settle_fence(cluster, [runc, "--root", str(runc_root)], name)
            committed = held == DestinationState.COMMITTED
            return DestinationState.COMMITTED if committed else DestinationState.FENCED

    if not _must_kill(decision, time.monotonic() + seconds, settle):
        return
    if netns_id:
        from godwit.network import delete_container_netns

        delete_container_netns(netns_id, name)
    subprocess.run([runc, "--root", str(runc_root), "delete", "--force", name],
                   stdin=subprocess.DEVNULL, capture_output=True, check=False)
    shutil.rmtree(container_dir, ignore_errors=True)


def _must_kill(decision: Path, deadline: float,
               settle: Callable[[], DestinationState] | None = None) -> bool:
    """Wait for a decision or the deadline: True when aborted or fenced now. The file is
    held open, so it is still read after its staging area went (a settled commit).
    `settle`: what an undecided copy becomes at the deadline (cluster mode: etcd's
    decision), else fenced."""
    try:
        f = open(decision, "r+")  # noqa: SIM115 - closed below
    except FileNotFoundError:  # dropped before the watchdog started: aborted
        return True
    with f:
        while time.monotonic() < deadline and _read(f) == DestinationState.PENDING:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if _read(f) == DestinationState.PENDING and settle is not None:
            return _decide(f, settle()) != DestinationState.COMMITTED
        if _read(f) == DestinationState.ABORTED:
            return True
        return _decide(f, DestinationState.FENCED) == DestinationState.FENCED


def _armed_by_agent() -> bool:
    """Standby: wait for the agent's byte; end of file without it is no restore."""
    return sys.stdin.buffer.read(1) == GO


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == STANDBY:
        args = args[1:]
        if not _armed_by_agent():
            sys.exit(0)
    decision_file, seconds, runc, runc_root, container, container_dir, netns = args[:7]
    watchdog(Path(decision_file), float(seconds), runc, Path(runc_root), container,
             Path(container_dir), netns, args[7:] or None)
