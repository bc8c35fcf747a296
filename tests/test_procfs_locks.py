"""File locks of a set of processes, read from /proc/locks, and the pre-flight rule."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from godwit.preflight import check_file_locks
from godwit.procfs import file_locks


def test_counts_the_locks_of_the_given_processes_only(tmp_path: Path) -> None:
    me = {os.getpid()}
    before = file_locks(me)
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        fcntl.flock(a, fcntl.LOCK_EX)
        fcntl.lockf(b, fcntl.LOCK_EX)
        assert file_locks(me) == before + 2
        assert file_locks({os.getppid()} - me) == file_locks({os.getppid()} - me)
        assert file_locks(set()) == 0
    assert file_locks(me) == before


def test_locks_refuse_shared_storage_only() -> None:
    assert check_file_locks(0, shared_storage=True).level == "ok"
    assert check_file_locks(2, shared_storage=False).level == "ok"
    refused = check_file_locks(2, shared_storage=True)
    assert refused.level == "error" and "--shared-storage" in refused.message
