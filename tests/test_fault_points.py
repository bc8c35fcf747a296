"""The freeze deadline against real hangs: a fault point (godwit.faults) stops a step on
purpose; the container must run again on the source within the deadline plus its margin,
with no copy left on the destination."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copies, wait_for

from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.testbed import Testbed
from godwit.migration.source import FREEZE_MARGIN_S

pytestmark = pytest.mark.integration
MAX_FREEZE_S = 4


def runc_commands(bed: Testbed, verb: str, host: str) -> list[str]:
    """Command lines of live `runc … <verb>` processes on a host's runc root."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if str(bed.host(host).runc_root).encode() in argv and verb.encode() in argv:
                found.append(b" ".join(argv).decode(errors="replace"))
    return found


@pytest.fixture
def faulty(bed: Testbed, request) -> Iterator[str]:
    """Restart one agent with GODWIT_FAULT set (param "host:stage:action"), and without
    it afterwards."""
    host, fault = request.param.split(":", 1)
    bed.stop_agent(host)
    bed.start_agent(host, env={"GODWIT_FAULT": fault})
    try:
        yield fault
    finally:
        bed.stop_agent(host)
        bed.start_agent(host)


@pytest.mark.parametrize(("faulty", "step"), [("a:dump:hang", "dump"),
                                              ("b:restore:hang", "restore")],
                         indirect=["faulty"])
def test_a_hung_step_ends_at_the_freeze_deadline(bed: Testbed, faulty: str,
                                                 step: str) -> None:
    name = f"hang-{step}"
    start = bed.godwit("run", name, "--bundle", str(counter_bundle(bed.bundle_dir(name))),
                       "--host", "a")
    assert start.returncode == 0, start.stderr
    rootfs = bed.bundle_dir(name) / "rootfs"
    wait_for(lambda: (read_count(rootfs) or 0) >= 3, what="counter")
    began = time.monotonic()
    result = bed.godwit("migrate", name, "--to", "b", "--json", "--strategy",
                        "stop-and-copy", "--max-freeze", str(MAX_FREEZE_S))
    took = time.monotonic() - began
    report = json.loads(result.stdout)
    print(f"{step}: downtime {report.get('downtime_s')} s, CLI {took:.2f} s")
    assert result.returncode != 0 and report["result"] == "failed", report
    assert report["error"] == f"freeze deadline of {MAX_FREEZE_S} s passed during {step}"
    assert report["outcome"] == "running on a (resumed)", report
    assert report["downtime_s"] <= MAX_FREEZE_S + FREEZE_MARGIN_S, report
    assert took < MAX_FREEZE_S + FREEZE_MARGIN_S + 10, "the CLI's own start-up and checks"
    assert copies(bed, name) == [("a", "running")]
    before = read_count(rootfs) or 0
    wait_for(lambda: (read_count(rootfs) or 0) > before + 3, what="counter running on a")
    assert not list((bed.host("b").state_dir / "incoming").glob("*")), "b keeps nothing"
    left = runc_commands(bed, "checkpoint", "a") + runc_commands(bed, "restore", "b")
    assert not left, f"runc/CRIU of the migration still running: {left}"
    runc_dir = bed.host("b").runc_root / name
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(runc_dir) not in mounts, "the killed restore's mount of the rootfs is still there"
    assert not runc_dir.exists(), "runc's state of the killed restore is left on b"
    bed.godwit("rm", name)
