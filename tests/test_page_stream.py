"""Stop-and-copy's page server on the destination: one a previous agent left behind goes
at the sweep, and only that process (not another one that got its pid)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

from godwit import procfs
from godwit.migration.receiver import PAGE_SERVER, Receiver, _kill_orphan, _save_process


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


def test_a_torn_record_is_ignored(tmp_path: Path) -> None:
    """An agent killed while writing the record (an older godwit wrote it in place) must
    not keep the next agent from starting."""
    saved = tmp_path / PAGE_SERVER
    for torn in ("", '{"pid": 12', '{"start": "1"}', "[]"):
        saved.write_text(torn)
        _kill_orphan(saved)


def test_records_are_replaced_never_rewritten_in_place(tmp_path: Path) -> None:
    """A reader (the next agent's sweep) never sees a half-written record: the new one is
    renamed over the old, so an open of the old file still reads it whole."""
    saved = tmp_path / PAGE_SERVER
    _save_process(saved, os.getpid())
    with open(saved) as old:
        _save_process(saved, os.getppid())
        assert json.loads(old.read())["pid"] == os.getpid()
    assert json.loads(saved.read_text())["pid"] == os.getppid()
    assert [p.name for p in tmp_path.iterdir()] == [PAGE_SERVER]


def test_a_committed_image_leaves_at_once_and_is_deleted_after(tmp_path: Path) -> None:
    """The commit's answer does not wait for the memory image's deletion."""
    async def commit_leftovers() -> None:
        receiver = Receiver(None, tmp_path)  # type: ignore[arg-type]  # no container here
        images = tmp_path / "incoming" / "m1" / "images"
        images.mkdir(parents=True)
        (images / "pages-1.img").write_bytes(os.urandom(1 << 20))
        receiver._throw_away(images)
        assert not images.exists() and [p.name for p in receiver.trash.glob("*/*")] == [
            "pages-1.img"], "moved out of the staging area, not deleted yet"
        await asyncio.gather(*receiver.watchers)
        assert not list(receiver.trash.iterdir())

    asyncio.run(commit_leftovers())


def test_the_sweep_empties_what_a_stopped_agent_left_in_the_trash(tmp_path: Path) -> None:
    receiver = Receiver(None, tmp_path)  # type: ignore[arg-type]
    (receiver.trash / "0123" / "images").mkdir(parents=True)
    receiver.sweep()
    assert not receiver.trash.exists()
