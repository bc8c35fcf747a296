"""A lazy restore's lazy-pages daemon starts at arm, before the freeze, and reads its
images only once the restore connects (scripts/criu-patches/0022, --start-before-images):
its start is no longer paid while the container is frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import copies, wait_for
from faultmatrix import faulty_agent
from memhog_container import (
    failed_post_copy,
    migrate_in_background,
    report_of,
    rootfs_on,
    start_memhog,
    verify,
)

from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration


def lazy_daemons(bed: Testbed, host: str) -> list[list[str]]:
    """Command lines of the `criu lazy-pages` daemons of a host's migrations."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode().split("\0")
        except OSError:
            continue
        if "lazy-pages" in argv and any(str(bed.host(host).state_dir) in a for a in argv):
            found.append(argv)
    return found


@pytest.mark.parametrize("strategy", ["post-copy", "stop-and-copy"])
def test_the_daemon_waits_from_arm_and_serves_the_restore(bed: Testbed, strategy: str) -> None:
    """The destination holds the images 3 s (a pause fault): the daemon already runs,
    with no images yet. The container then moves with every byte of its memory."""
    name = f"early-{strategy}"
    _, before = start_memhog(bed, name, 64)
    with faulty_agent(bed, "b", "images:pause"):
        migrating = migrate_in_background(bed, name, strategy)
        daemons = wait_for(lambda: lazy_daemons(bed, "b"), timeout=30,
                           what="a lazy-pages daemon on b before the images")
        report = report_of(migrating, timeout=120)
    assert migrating.returncode == 0 and report["result"] == "ok", report
    assert "--start-before-images" in daemons[0]
    assert ("--page-server" in daemons[0]) == (strategy == "post-copy")
    after = verify(bed, name, rootfs_on(bed, name))
    assert after["ok"] == 1 and after["checksum"] == before["checksum"]
    assert copies(bed, name) == [("b", "running")]
    bed.godwit("rm", name)


def test_a_migration_that_fails_before_the_restore_leaves_no_daemon(bed: Testbed) -> None:
    name = "early-abort"
    failed_post_copy(bed, name, "images:error")
    assert lazy_daemons(bed, "b") == [], "the daemon started at arm must go with the abort"
    bed.godwit("rm", name)
