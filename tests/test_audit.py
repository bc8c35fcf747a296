"""The audit log stays bounded: past its size it rolls over, one generation kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from godwit import audit
from godwit.audit import AuditLog


def test_the_audit_log_rolls_over_past_its_size(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_BYTES", 1000)
    log = AuditLog(tmp_path / "audit.log")
    for i in range(40):
        log.record("op", "POST", f"/v1/containers/c{i}/signal", 200)
    current, previous = tmp_path / "audit.log", tmp_path / "audit.log.1"
    assert previous.exists() and previous.stat().st_size > 1000
    assert current.stat().st_size <= 1000 + 200
    assert "/v1/containers/c39/signal" in current.read_text()
    assert (current.stat().st_mode & 0o777) == 0o600


def test_reads_are_not_audited(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.record("viewer", "GET", "/v1/containers", 200)
    assert not (tmp_path / "audit.log").exists()
