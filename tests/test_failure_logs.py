"""Retention of the logs of failed migrations (godwit.migration.failure_logs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from godwit.errors import GodwitError
from godwit.migration import failure_logs
from godwit.migration.failure_logs import FailureLogs


def work_dir(tmp_path: Path, **files: str) -> dict[str, Path]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    paths = {}
    for name, text in files.items():
        (work / name).write_text(text)
        paths[f"{name}.log"] = work / name
    return paths


def test_keeps_present_logs_and_reads_them_back(tmp_path: Path) -> None:
    logs = FailureLogs(tmp_path / "kept")
    paths = work_dir(tmp_path, dump="dump failed\n")
    logs.keep("abc-1", {**paths, "restore.log": tmp_path / "missing"})
    assert logs.read("abc-1") == [{"name": "dump.log", "size": 12, "text": "dump failed\n"}]
    assert logs.read("abc-2") == []
    logs.keep("abc-3", {"restore.log": tmp_path / "missing"})
    assert not (tmp_path / "kept" / "abc-3").exists(), "nothing to keep: no directory"


def test_newest_migrations_are_kept_within_count_and_size(tmp_path: Path) -> None:
    logs = FailureLogs(tmp_path / "kept", max_migrations=3, max_bytes=250)
    for n in range(5):
        logs.keep(f"{n}", work_dir(tmp_path, dump="x" * 100))
        os.utime(tmp_path / "kept" / f"{n}", (n, n))  # distinct ages, oldest first
    logs.prune()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["3", "4"], "250 bytes"
    big = FailureLogs(tmp_path / "big", max_migrations=3, max_bytes=10)
    big.keep("1", work_dir(tmp_path, dump="y" * 100))
    assert big.read("1"), "the newest migration stays even above the size limit"


def test_a_long_log_keeps_head_and_tail(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(failure_logs, "MAX_FILE_BYTES", 100)
    monkeypatch.setattr(failure_logs, "HEAD_BYTES", 30)
    text = "".join(f"line {n:04d}\n" for n in range(100))  # 1000 bytes
    logs = FailureLogs(tmp_path / "kept")
    logs.keep("1", work_dir(tmp_path, dump=text))
    kept = logs.read("1")[0]["text"]
    assert kept.startswith(text[:30]) and kept.endswith(text[-70:])
    assert "[... 900 bytes cut by godwit ...]" in kept


def test_bad_ids_are_refused_and_keep_never_raises(tmp_path: Path) -> None:
    logs = FailureLogs(tmp_path / "kept")
    with pytest.raises(GodwitError):
        logs.read("../etc")
    logs.keep("../etc", work_dir(tmp_path, dump="x"))
    assert not (tmp_path / "etc").exists()


def test_prune_drops_half_written_copies(tmp_path: Path) -> None:
    logs = FailureLogs(tmp_path / "kept")
    logs.keep("1", work_dir(tmp_path, dump="x"))
    (tmp_path / "kept" / "1" / ".tmp-restore.log").write_text("partial")
    logs.prune()
    assert [e["name"] for e in logs.read("1")] == ["dump.log"]
    assert not (tmp_path / "kept" / "1" / ".tmp-restore.log").exists()
