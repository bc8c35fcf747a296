"""Named fault points, for tests: `GODWIT_FAULT=<stage>:<action>` in an agent's environment
makes that agent fail on purpose when a migration reaches the stage, on whichever side
(source or destination) the agent plays. Unset, every point is a no-op.

Stages: prepare, rootfs, arm, freeze, dump, images, restore, commit.
Actions:
  hang   the step never ends (its runc/CRIU, when it has one, is stopped with SIGSTOP), as
         with a hung CRIU or peer; only cancelling the step ends the wait
  error  the step fails with an error
  crash  the agent exits at once, as if killed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from godwit.errors import GodwitError

ENV = "GODWIT_FAULT"
STAGES = ("prepare", "rootfs", "arm", "freeze", "dump", "images", "restore", "commit")
ACTIONS = ("hang", "error", "crash")
CRASH_EXIT = 137
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


async def point(stage: str, process_group: int | None = None) -> None:
    """A fault point; `process_group`: the step's runc/CRIU, stopped by a hang."""
    fault = configured()
    if fault is None or fault[0] != stage:
        return
    action = fault[1]
    log.warning("fault injected at %s: %s", stage, action)
    if action == "crash":
        os._exit(CRASH_EXIT)
    if action == "error":
        raise GodwitError(f"fault injected at {stage}")
    if process_group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process_group, signal.SIGSTOP)
    await asyncio.Event().wait()
