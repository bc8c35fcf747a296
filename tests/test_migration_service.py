"""The end of an outgoing migration (godwit.migration.service): the cluster hears it before
the client, so a CLI that returned finds the report in etcd and the name unlocked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from godwit.errors import GodwitError
from godwit.migration import MigrationOptions
from godwit.migration.report import EventStream, MigrationReport
from godwit.migration.service import Migrations
from godwit.migration.states import Result
from godwit.protocol import HostInfo


class RecordingGuard:
    """A SourceGuard's end, noting what the client had been told by then."""

    def __init__(self, events: EventStream) -> None:
        self.events, self.told_before_end, self.report = events, -1, None

    async def end(self, report: dict) -> None:
        self.told_before_end, self.report = self.events.queue.qsize(), report


async def unreachable_host() -> HostInfo:
    raise GodwitError("host description unavailable")


def test_the_cluster_hears_the_end_before_the_client(tmp_path: Path) -> None:
    report = MigrationReport(id="0-1", container="c", source="a", destination="b",
                             strategy="stop-and-copy")
    events = EventStream(report)
    guard = RecordingGuard(events)
    migrations = Migrations("a", None, tmp_path, unreachable_host)  # type: ignore[arg-type]
    options = MigrationOptions(to="127.0.0.1:1")
    asyncio.run(migrations.run("c", options, events, guard))  # type: ignore[arg-type]
    assert guard.report is not None and guard.report["result"] == Result.FAILED
    assert guard.told_before_end == 0, "the client was told before etcd had the report"
    assert events.queue.qsize() == 2  # then the result and the end of the stream
    assert (tmp_path / "reports" / "0-1.json").exists()


class FailingGuard:
    async def end(self, report: dict) -> None:
        raise RuntimeError("etcd client broke")


def test_the_client_hears_the_end_even_when_the_cluster_step_fails(tmp_path: Path) -> None:
    report = MigrationReport(id="0-2", container="c", source="a", destination="b",
                             strategy="stop-and-copy")
    events = EventStream(report)
    migrations = Migrations("a", None, tmp_path, unreachable_host)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="etcd client broke"):
        asyncio.run(migrations.run("c", MigrationOptions(to="127.0.0.1:1"), events,
                                   FailingGuard()))  # type: ignore[arg-type]
    assert events.queue.qsize() == 2, "the client was left waiting for the end"
