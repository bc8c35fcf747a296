"""Timeline PNG of a migration report (godwit.plot)."""

from __future__ import annotations

import struct
from pathlib import Path

from godwit.migration.report import MigrationReport, Phase
from godwit.plot import timeline_png

T0 = 1_700_000_000.0
PHASES = [("prepare", 0.00, 0.08), ("rootfs", 0.08, 1.90), ("freeze", 1.90, 1.93),
          ("rootfs-sync", 1.93, 2.05), ("dump", 2.05, 2.60), ("images", 2.60, 3.40),
          ("restore", 3.40, 3.95), ("verify", 3.95, 4.16), ("commit", 4.16, 4.20),
          ("cleanup", 4.20, 4.31)]


def sample_report(**changes: object) -> dict:
    report = MigrationReport(
        id="3f2c9a", container="memhog", source="a", destination="b",
        strategy="stop-and-copy", started_at=T0, finished_at=T0 + 4.31, result="ok",
        frozen_at=T0 + 1.92, resumed_at=T0 + 3.95, downtime_s=2.03,
        phases=[Phase(name, T0 + start, T0 + end) for name, start, end in PHASES],
    )
    return report.to_json() | changes


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_timeline_png(tmp_path: Path) -> None:
    path = timeline_png(sample_report(), tmp_path / "plots" / "timeline.png")
    assert path == tmp_path / "plots" / "timeline.png"
    width, height = png_size(path)
    assert width == 800 and 300 <= height <= 700
    assert 10_000 < path.stat().st_size < 300_000


def test_failed_and_empty_reports_still_render(tmp_path: Path) -> None:
    failed = sample_report(result="failed", resumed_at=None, downtime_s=None,
                           phases=sample_report()["phases"][:5])
    assert png_size(timeline_png(failed, tmp_path / "failed.png"))[0] == 800
    empty = sample_report(phases=[], frozen_at=None, resumed_at=None)
    assert png_size(timeline_png(empty, tmp_path / "empty.png"))[0] == 800
