"""A restarted source agent settles a migration from its journal's stage: the real
SourceMigration.recover against a fake peer; the source copy's pause/resume is faked."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from godwit.errors import GodwitError
from godwit.migration import MigrationOptions
from godwit.migration.journal import Journal, Journals
from godwit.migration.report import EventStream, MigrationReport
from godwit.migration.source import RESTARTED, SourceContext, SourceMigration
from godwit.migration.states import DestinationState, Result, Stage
from godwit.protocol import IncomingState

OPTIONS = MigrationOptions(to="b", commit_timeout=5)


class FakeStore:
    def record(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(rootfs="/nonexistent", net=None, private_netns=False,
                               owns_netns=False)


class FakeDest:
    """The destination's answer about the migration; None: it does not answer."""

    def __init__(self, state: DestinationState | None) -> None:
        self.state = state

    async def incoming_state(self, migration_id: str) -> IncomingState:
        if self.state is None:
            raise GodwitError("cannot connect")
        return IncomingState(state=self.state)


class Recovering(SourceMigration):
    cleaned = resumed = False

    async def abort_destination(self) -> DestinationState:
        return DestinationState.ABORTED

    async def resume_source(self) -> None:
        self.resumed = True

    async def cleanup_source(self) -> None:
        self.cleaned = True


def recover(tmp_path: Path, stage: Stage, dest: DestinationState | None) -> Recovering:
    journals = Journals(tmp_path)
    journal = Journal("9a", "c", "stop-and-copy", OPTIONS.to_json(), stage)
    journals.save(journal)
    ctx = SourceContext(FakeStore(), FakeDest(dest), journals,  # type: ignore[arg-type]
                        journals.work_dir("9a"), {})
    report = MigrationReport("9a", "c", "a", "b", "stop-and-copy")
    migration = Recovering(ctx, "c", OPTIONS, EventStream(report))
    asyncio.run(migration.recover(journals.all()[0]))
    return migration


@pytest.mark.parametrize("stage", [Stage.PREPARED, Stage.FROZEN, Stage.RESTORED])
def test_before_the_commit_the_source_copy_is_resumed(tmp_path: Path, stage: Stage) -> None:
    migration = recover(tmp_path, stage, DestinationState.PENDING)
    report = migration.report
    assert (report.result, report.error) == (Result.FAILED, RESTARTED)
    frozen = stage >= Stage.FROZEN
    assert migration.resumed is frozen
    assert report.outcome == ("running on a (resumed)" if frozen
                              else "running on a (never frozen)")
    assert report.finished_at and not Journals(tmp_path).all()


def test_a_commit_the_destination_took_is_kept(tmp_path: Path) -> None:
    migration = recover(tmp_path, Stage.COMMIT_SENT, DestinationState.COMMITTED)
    assert migration.report.result == Result.OK and migration.cleaned
    assert not migration.resumed and not Journals(tmp_path).all()


def test_an_unanswered_commit_stays_in_doubt(tmp_path: Path) -> None:
    migration = recover(tmp_path, Stage.COMMIT_SENT, None)
    report = migration.report
    assert (report.result, report.error) == (Result.IN_DOUBT, RESTARTED)
    assert "`godwit resume c` or `godwit rm c`" in report.outcome
    assert not migration.resumed and not migration.cleaned
    assert [j.stage for j in Journals(tmp_path).all()] == [Stage.COMMIT_SENT]
