"""Stop-and-copy's page server on the destination: one a previous agent left behind goes
at the sweep, and only that process (not another one that got its pid)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from godwit import procfs
from godwit.migration.receiver import PAGE_SERVER, _kill_orphan


def _orphan(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    saved = tmp_path / PAGE_SERVER
    saved.write_text(json.dumps({"pid": proc.pid, "start": procfs.start_time(proc.pid)}))
    return proc, saved


def test_an_orphaned_page_server_is_killed(tmp_path: Path) -> None:
    proc, saved = _orphan(tmp_path)
    _kill_orphan(saved)
    assert proc.wait(timeout=5) == -9


def test_a_process_that_reused_the_pid_is_left_alone(tmp_path: Path) -> None:
    proc, saved = _orphan(tmp_path)
    saved.write_text(json.dumps({"pid": proc.pid, "start": "1"}))  # another start time
    try:
        _kill_orphan(saved)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_no_page_server_no_harm(tmp_path: Path) -> None:
    _kill_orphan(tmp_path / PAGE_SERVER)
