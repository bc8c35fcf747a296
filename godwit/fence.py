"""Fencing of a restored-but-uncommitted container, independent of the agent process.

Before a destination restores a container it writes a decision file reading `pending`
and starts this watchdog in its own session. Whoever changes the decision first wins,
under an exclusive flock: the agent's commit writes `committed`, an abort writes
`aborted`, the watchdog at the deadline writes `fenced` and deletes the container.
So a destination copy runs for good only if the source heard "committed", even when the
destination agent dies between restore and commit.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

PENDING, COMMITTED, ABORTED, FENCED = "pending", "committed", "aborted", "fenced"


def read_decision(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ABORTED


def decide(path: Path, new: str) -> str:
    """Move `pending` to `new` atomically; return the decision that holds afterwards."""
    with open(path, "r+") as f:
        return _decide(f, new)


def _decide(f: IO[str], new: str) -> str:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        current = _read(f)
        if current != PENDING:
            return current
        f.seek(0)
        f.truncate()
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
        return new
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def _read(f: IO[str]) -> str:
    f.seek(0)
    return f.read().strip()


def start_watchdog(decision: Path, seconds: float, runc: tuple[str, Path], name: str,
                   container_dir: Path, netns_id: str | None = None,
                   cluster: list[str] | None = None) -> None:
    """Arm the watchdog; it outlives the agent. `runc` is (binary, root) of the agent's
    runc. With `netns_id`, the container's netns is deleted (isolating it) before the
    container is killed. With `cluster` (cluster mode: ClusterMigrations.fence_args), an
    undecided copy at the deadline lives or dies by the decision in etcd."""
    decision.write_text(PENDING)
    argv = [sys.executable, "-m", "godwit.fence", str(decision), str(seconds), runc[0],
            str(runc[1]), name, str(container_dir), netns_id or "", *(cluster or [])]
    subprocess.Popen(
        argv, start_new_session=True, close_fds=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def watchdog(decision: Path, seconds: float, runc: str, runc_root: Path, name: str,
             container_dir: Path, netns_id: str = "", cluster: list[str] | None = None) -> None:
    """Sleep until the deadline; fence the container unless it was committed. An aborted
    copy is killed here too, in case the agent's own kill failed (killing is idempotent)."""
    settle = None
    if cluster:

        def settle() -> str:
            # imported only now: the decision file must be opened first (gRPC takes a
            # while to import, and a committed migration's staging area goes at once)
            from godwit.cluster.migration_hooks import settle_fence

            held = settle_fence(cluster, [runc, "--root", str(runc_root)], name)
            return COMMITTED if held == COMMITTED else FENCED

    if not _must_kill(decision, time.monotonic() + seconds, settle):
        return
    if netns_id:
        from godwit.network import delete_container_netns

        delete_container_netns(netns_id, name)
    subprocess.run([runc, "--root", str(runc_root), "delete", "--force", name],
                   stdin=subprocess.DEVNULL, capture_output=True, check=False)
    shutil.rmtree(container_dir, ignore_errors=True)


def _must_kill(decision: Path, deadline: float,
               settle: Callable[[], str] | None = None) -> bool:
    """Wait for a decision or the deadline: True when aborted or fenced now. The file is
    held open, so it is still read after its staging area went (a settled commit).
    `settle`: what an undecided copy becomes at the deadline (cluster mode: etcd's
    decision), else fenced."""
    try:
        f = open(decision, "r+")  # noqa: SIM115 - closed below
    except FileNotFoundError:  # dropped before the watchdog started: aborted
        return True
    with f:
        while time.monotonic() < deadline and _read(f) == PENDING:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if _read(f) == PENDING and settle is not None:
            return _decide(f, settle()) != COMMITTED
        return _read(f) == ABORTED or _decide(f, FENCED) == FENCED


if __name__ == "__main__":
    decision_file, seconds, runc, runc_root, container, container_dir, netns = sys.argv[1:8]
    watchdog(Path(decision_file), float(seconds), runc, Path(runc_root), container,
             Path(container_dir), netns, sys.argv[8:] or None)
