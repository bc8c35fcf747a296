"""`Runc.delete` of a live container: its init is killed and gone before `runc delete`
runs, so runc never takes its `--force` path (SIGKILL, then a fixed 100 ms sleep)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _require_runtime, wait_for

from godwit import freezer, procfs
from godwit.lab.bundles import counter_bundle, read_count
from godwit.runc import DEFAULT_RUNC, Runc

pytestmark = pytest.mark.integration

# A runc that, before running `delete`, notes whether the container's init still runs.
RECORDING_RUNC = """#!/bin/sh
for verb in "$@"; do case "$verb" in --*|/*) ;; *) break ;; esac; done
if [ "$verb" = delete ]; then
  for name in "$@"; do :; done
  pid=$(sed -n 's/.*"init_process_pid":\\([0-9]*\\).*/\\1/p' "{root}/$name/state.json")
  state=$(sed -n 's/^[^)]*) \\(.\\).*/\\1/p' /proc/$pid/stat 2>/dev/null)
  echo "delete init=${{state:-gone}}" >>"{log}"
fi
exec {runc} "$@"
"""


@pytest.fixture
def recording_runc(tmp_path: Path) -> Iterator[tuple[Runc, Path]]:
    """A Runc whose binary logs the init's state at each `runc delete`, and that log."""
    _require_runtime()
    root, log = tmp_path / "root", tmp_path / "runc-calls.log"
    script = tmp_path / "runc"
    script.write_text(RECORDING_RUNC.format(root=root, log=log,
                                            runc=shutil.which(DEFAULT_RUNC)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    runc = Runc(root, work_dir=tmp_path / "work", binary=str(script))
    yield runc, log
    asyncio.run(Runc(root).delete("gone"))


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_delete_kills_the_init_before_runc_deletes(recording_runc: tuple[Runc, Path],
                                                   tmp_path: Path, paused: bool) -> None:
    runc, log = recording_runc
    bundle = counter_bundle(tmp_path / "bundle", cgroups_path=f"/godwit-test-{os.getpid()}")
    asyncio.run(runc.run_detached("gone", bundle))
    wait_for(lambda: read_count(bundle / "rootfs"), what="the counter")
    init = asyncio.run(runc.state("gone")).pid
    if paused:
        freezer.freeze(Path("/sys/fs/cgroup"), f"/godwit-test-{os.getpid()}")

    asyncio.run(runc.delete("gone"))

    assert log.read_text().split("\n")[0] in ("delete init=gone", "delete init=Z"), \
        log.read_text()
    assert not procfs.alive(init)
    assert not (runc.root / "gone").exists()
