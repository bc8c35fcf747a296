"""Named fault points, for tests: `GODWIT_FAULT=<stage>:<action>` in an agent's environment
makes that agent fail on purpose when a migration reaches the stage, on whichever side
(source or destination) the agent plays. Unset, every point is a no-op.

Stages: prepare, rootfs, arm, freeze, dump, images, restore, verify (source only), commit,
commit-done (destination only: it committed, in etcd too in cluster mode, and not yet said so),
departure (source only: the background deletion of the copy that left, godwit.departures).
Actions:
  hang     the step never ends (its runc/CRIU, when it has one, is stopped with SIGSTOP), as
           with a hung CRIU or peer; only cancelling the step ends the wait
  error    the step fails with an error
  crash    the agent exits at once, as if killed
  pause    the step waits PAUSE_S seconds, then goes on; a step with a runc/CRIU has it
           stopped (SIGSTOP) for that time as soon as CRIU runs: a window for a test to
           cut the link, fill the disk or kill CRIU in the middle of the step
  corrupt  (images, rootfs; source side) one byte of file data is flipped on the wire,
           after its digest was taken, as by a faulty link the transport must catch
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from godwit import procfs
from godwit.errors import GodwitError

ENV = "GODWIT_FAULT"
STAGES = ("prepare", "rootfs", "arm", "freeze", "dump", "images", "restore", "verify",
          "commit", "commit-done", "departure")
ACTIONS = ("hang", "error", "crash", "pause", "corrupt")
CRASH_EXIT = 137
PAUSE_S = 3.0
CRIU_START_S = 5.0  # a pause waits this long at most for the step's CRIU to start
log = logging.getLogger("godwit.faults")


def configured() -> tuple[str, str] | None:
    """(stage, action) from the environment, or None; a bad value is an error."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    stage, _, action = spec.partition(":")
    if stage not in STAGES or action not in ACTIONS:
        raise GodwitError(f"bad {ENV}={spec!r}: want <stage>:<action>, stage one of "
                          f"{', '.join(STAGES)}, action one of {', '.join(ACTIONS)}")
    return stage, action


async def point(stage: str, runc_pid: int | None = None) -> None:
    """A fault point; `runc_pid`: the step's runc, stopped with its CRIU by a hang or
    pause."""
    fault = configured()
    if fault is None or fault[0] != stage or fault[1] == "corrupt":
        return
    action = fault[1]
    log.warning("fault injected at %s: %s", stage, action)
    if action == "crash":
        os._exit(CRASH_EXIT)
    if action == "error":
        raise GodwitError(f"fault injected at {stage}")
    if action == "pause":
        await _pause(runc_pid)
        return
    if runc_pid:
        _signal_tree(runc_pid, signal.SIGSTOP)
    await asyncio.Event().wait()


async def _pause(runc_pid: int | None) -> None:
    if runc_pid:
        await asyncio.to_thread(_wait_for_criu, runc_pid)
        _signal_tree(runc_pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE_S)
    finally:
        if runc_pid:
            _signal_tree(runc_pid, signal.SIGCONT)


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a process and its descendants (runc and its CRIU)."""
    for one in [pid, *procfs.descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(one, sig)


def _wait_for_criu(runc_pid: int) -> None:
    """Until runc's CRIU runs (the gate let the request through and exec'd it); at most
    CRIU_START_S."""
    deadline = time.monotonic() + CRIU_START_S
    while time.monotonic() < deadline:
        if any(procfs.command_name(pid) == "criu" for pid in procfs.descendants(runc_pid)):
            return
        time.sleep(0.002)


def corrupter(stage: str) -> Callable[[bytes], bytes] | None:
    """With `<stage>:corrupt`: a function that flips one bit of the first file data it is
    given (after its digest was taken), and passes everything else unchanged."""
    fault = configured()
    if fault != (stage, "corrupt"):
        return None
    done = False

    def corrupt(data: bytes) -> bytes:
        nonlocal done
        if done or not data:
            return data
        done = True
        log.warning("fault injected at %s: corrupt", stage)
        return bytes([data[0] ^ 0x01]) + data[1:]

    return corrupt
