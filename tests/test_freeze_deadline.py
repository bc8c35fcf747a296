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
from godwit.transport import TreePlan, plan_tree

DEADLINE_S = 0.5


class FakeStore:
    """What SourceMigration asks of a host's containers."""

    def record(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(rootfs="/nonexistent", net=None, private_netns=False,
                               owns_netns=False)

    def memory_usage(self, name: str) -> int:
        return 0

    def pids(self, name: str) -> set[int]:
        return set()  # no process: nothing held dirty to write back


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
        self.uploads.append((what, [path for path, _ in plan.entries], phase))
        if self.upload_error:
            raise GodwitError(self.upload_error)
        return plan.total_bytes


def migration(tmp_path: Path, held: HeldRunc | None = None,
              rootfs: Path | None = None) -> FrozenOnly:
    """A migration frozen with `held` as its dump; with shared storage unless `rootfs`
    (its first pass already taken) is to be carried."""
    journals = Journals(tmp_path)
    ctx = SourceContext(FakeStore(), None, journals, journals.work_dir("1234"),  # type: ignore[arg-type]
                        {})
    options = MigrationOptions(to="b", shared_storage=rootfs is None, max_freeze=DEADLINE_S)
    report = MigrationReport("1234", "c", "a", "b", "stop-and-copy")
    moving = FrozenOnly(ctx, "c", options, EventStream(report))
    moving.held_dump = held
    moving.uploads, moving.upload_error = [], None
    if rootfs:
        moving.record.rootfs = str(rootfs)
        moving.manifest = plan_tree(rootfs).manifest
    return moving


def changed_rootfs(tmp_path: Path) -> Path:
    """A rootfs whose file "changed" changes after the first pass."""
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "changed").write_text("before")
    return rootfs


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


def run_with_held_dump(tmp_path: Path) -> FrozenOnly:
    """Execute a shared-storage migration whose dump is `hung_dump`'s (what it does then is
    the fault's)."""
    async def scenario() -> FrozenOnly:
        held, _ = await hung_dump()
        moving = migration(tmp_path, held)
        await moving.execute()
        return moving

    return asyncio.run(scenario())


def test_an_error_fault_fails_the_step_at_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GODWIT_FAULT", "dump:error")
    report = run_with_held_dump(tmp_path).report
    assert report.error == "fault injected at dump" and report.result == "failed"
    assert report.downtime_s is not None and report.downtime_s < DEADLINE_S


def test_the_rootfs_frozen_pass_runs_beside_the_dump(tmp_path: Path, monkeypatch) -> None:
    """With the dump hung, the rootfs's changes still go; the deadline then names the dump,
    the step still under way, and the rollback kills it."""
    monkeypatch.setenv("GODWIT_FAULT", "dump:hang")
    rootfs = changed_rootfs(tmp_path)

    async def scenario() -> tuple[FrozenOnly, asyncio.subprocess.Process]:
        held, proc = await hung_dump()
        moving = migration(tmp_path, held, rootfs)
        (rootfs / "changed").write_text("after, while frozen")
        await moving.execute()
        return moving, proc

    moving, dump = asyncio.run(scenario())
    [(what, paths, phase)] = moving.uploads
    assert (what, phase) == ("rootfs", "rootfs-sync") and "changed" in paths
    assert moving.report.error == f"freeze deadline of {DEADLINE_S:g} s passed during dump"
    assert dump.returncode == -9 and moving.resumed


def test_the_shared_storage_write_back_runs_beside_the_dump(tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("GODWIT_FAULT", "dump:hang")
    report = run_with_held_dump(tmp_path).report
    phases = {phase.name: phase for phase in report.phases}
    assert phases["rootfs-sync"].ended < phases["dump"].ended, "not beside the dump"
    assert report.error == f"freeze deadline of {DEADLINE_S:g} s passed during dump"


def test_a_failed_rootfs_pass_calls_off_the_dump_at_once(tmp_path: Path, monkeypatch) -> None:
    """The rootfs's frozen pass fails while the dump runs: that failure is the report's at
    once, not the deadline, and the dump is killed."""
    monkeypatch.setenv("GODWIT_FAULT", "dump:hang")
    rootfs = changed_rootfs(tmp_path)

    async def scenario() -> tuple[FrozenOnly, asyncio.subprocess.Process, float]:
        held, proc = await hung_dump()
        moving = migration(tmp_path, held, rootfs)
        moving.upload_error = "rootfs transfer failed: No space left on device"
        started = time.monotonic()
        await moving.execute()
        return moving, proc, time.monotonic() - started

    moving, dump, took = asyncio.run(scenario())
    assert moving.report.error == "rootfs transfer failed: No space left on device"
    assert took < DEADLINE_S, "not left to the deadline"
    assert dump.returncode == -9 and moving.aborted and moving.resumed


def test_default_deadline_and_bad_values() -> None:
    assert default_max_freeze(0) == 30
    assert default_max_freeze(2 << 30) == pytest.approx(30 + 21.47, abs=0.01)
    with pytest.raises(GodwitError, match="at least"):
        MigrationOptions(to="b", max_freeze=0.1)
