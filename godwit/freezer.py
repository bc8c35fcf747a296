"""Freezing a container's cgroup the way `runc pause` does, without starting runc.

A migration's freeze starts with it, so the ~5 ms of a runc start count. runc derives
"paused" from the same freezer state, so `runc state`, `runc resume` and CRIU see the
container exactly as after `runc pause`.
"""

from __future__ import annotations

import time
from pathlib import Path

from godwit.errors import GodwitError

FREEZE_TIMEOUT_S = 5.0
POLL_S = 0.0002


def freeze(root: Path, cgroups_path: str) -> None:
    """Freeze every task of the cgroup (v1 freezer controller under `root`, else cgroup
    v2) and return once they all are."""
    relative = cgroups_path.strip("/")
    v1 = root / "freezer" / relative / "freezer.state"
    if v1.exists():
        _set_and_wait(v1, "FROZEN", v1, "FROZEN")
        return
    for v2 in (root / relative, root / "unified" / relative):
        if (v2 / "cgroup.freeze").exists():
            _set_and_wait(v2 / "cgroup.freeze", "1", v2 / "cgroup.events", "frozen 1")
            return
    raise GodwitError(f"no freezer for cgroup {cgroups_path}")


def _set_and_wait(control: Path, value: str, status: Path, frozen: str) -> None:
    deadline = time.monotonic() + FREEZE_TIMEOUT_S
    control.write_text(value)
    while frozen not in status.read_text().splitlines():
        if time.monotonic() > deadline:
            raise GodwitError(f"cgroup not frozen after {FREEZE_TIMEOUT_S:.0f} s ({status})")
        control.write_text(value)  # as runc does: a v1 freeze can stall in FREEZING
        time.sleep(POLL_S)
