"""The freeze deadline, in seconds: SourceMigration's frozen steps against a fake peer,
a step hung on purpose with a godwit.faults point."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from godwit.errors import GodwitError
from godwit.migration import MigrationOptions, default_max_freeze
from godwit.migration.journal import Journals
from godwit.migration.report import EventStream, MigrationReport
from godwit.migration.source import FREEZE_MARGIN_S, SourceContext, SourceMigration
from godwit.migration.states import DestinationState, Stage
from godwit.runc import HeldRunc
from godwit.transport import TreePlan

DEADLINE_S = 0.5


class FakeStore:
    """What SourceMigration asks of a host's containers."""

    def record(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(rootfs="/nonexistent", net=None, private_netns=False,
                               owns_netns=False)

    def memory_usage(self, name: str) -> int:
        return 0


class FakeGate:
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class FrozenOnly(SourceMigration):
    """The real frozen steps and rollback; freezing, thawing and the peer are faked."""

    aborted = resumed = False

    async def migrate(self) -> None:
        self.reach(Stage.PREPARED)
        await self.migrate_frozen()

    async def freeze(self) -> None:
        with self.events.phase("freeze"):
            self.report.frozen_at = time.time()
            self.reach(Stage.FROZEN)

    async def abort_destination(self) -> DestinationState:
        self.aborted = True
        return DestinationState.ABORTED

    async def resume_source(self) -> None:
        self.resumed = True

    async def upload(self, what: str, plan: TreePlan, phase: str) -> int:
        return plan.total_bytes


def migration(tmp_path: Path, held: HeldRunc | None = None) -> FrozenOnly:
    journals = Journals(tmp_path)
    ctx = SourceContext(FakeStore(), None, journals, journals.work_dir("1234"),  # type: ignore[arg-type]
                        {})
    options = MigrationOptions(to="b", shared_storage=True, max_freeze=DEADLINE_S)
    report = MigrationReport("1234", "c", "a", "b", "stop-and-copy")
    moving = FrozenOnly(ctx, "c", options, EventStream(report))
    moving.held_dump = held
    return moving


async def hung_dump() -> tuple[HeldRunc, asyncio.subprocess.Process]:
    """A "runc checkpoint" (a sleep in its own session) released past its gate."""
    proc = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)
    return HeldRunc(FakeGate(), proc, proc.wait), proc  # type: ignore[arg-type]


def test_a_hung_dump_is_killed_and_the_source_resumed_at_the_deadline(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GODWIT_FAULT", "dump:hang")

    async def scenario() -> tuple[FrozenOnly, asyncio.subprocess.Process, float]:
        held, proc = await hung_dump()
        moving = migration(tmp_path, held)
        started = time.monotonic()
        await moving.execute()
        return moving, proc, time.monotonic() - started

    moving, dump, took = asyncio.run(scenario())
    report = moving.report
    assert report.result == "failed", report
    assert report.error == f"freeze deadline of {DEADLINE_S:g} s passed during dump"
    assert report.outcome == "running on a (resumed)"
    assert moving.aborted and moving.resumed
    assert dump.returncode == -9, "the stopped runc/CRIU of the dump is killed"
    assert report.max_freeze_s == DEADLINE_S
    assert DEADLINE_S <= took < DEADLINE_S + FREEZE_MARGIN_S
    assert report.downtime_s is not None and report.downtime_s < DEADLINE_S + 0.5


@pytest.mark.parametrize("stage", ["images", "restore"])
def test_the_report_names_the_step_that_overran(tmp_path: Path, monkeypatch,
                                                stage: str) -> None:
    monkeypatch.setenv("GODWIT_FAULT", f"{stage}:hang")

    async def scenario() -> FrozenOnly:
        held, proc = await hung_dump()
        moving = migration(tmp_path, held)
        moving.images.mkdir(parents=True)
        held.outcome = lambda: asyncio.sleep(0, "dumped")  # the dump itself is quick
        await moving.execute()
        proc.kill()
        await proc.wait()
        return moving

    report = asyncio.run(scenario()).report
    assert report.error == f"freeze deadline of {DEADLINE_S:g} s passed during {stage}"
    assert report.result == "failed" and report.outcome == "running on a (resumed)"


def test_an_error_fault_fails_the_step_at_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GODWIT_FAULT", "dump:error")

    async def scenario() -> FrozenOnly:
        held, _ = await hung_dump()
        moving = migration(tmp_path, held)
        await moving.execute()
        return moving

    report = asyncio.run(scenario()).report
    assert report.error == "fault injected at dump" and report.result == "failed"
    assert report.downtime_s is not None and report.downtime_s < DEADLINE_S


def test_default_deadline_and_bad_values() -> None:
    assert default_max_freeze(0) == 30
    assert default_max_freeze(2 << 30) == pytest.approx(30 + 21.47, abs=0.01)
    with pytest.raises(GodwitError, match="at least"):
        MigrationOptions(to="b", max_freeze=0.1)
