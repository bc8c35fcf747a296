"""How the source learns that the destination has all the memory: a long poll on a
destination of protocol 2.4 or later (`GET /v1/incoming/{id}/pages`), a poll every
PAGES_POLL_S on an older one. Both sides' decision logic, with a fake peer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from godwit.containers import ContainerStore
from godwit.migration import MigrationOptions
from godwit.migration.receiver import PAGES, Receiver
from godwit.migration.report import EventStream, MigrationReport
from godwit.migration.source import PAGES_POLL_S, SourceMigration
from godwit.migration.states import DestinationState
from godwit.protocol import IncomingState
from godwit.runc import Runc

MIGRATION = "0123abcd"


def receiver_with_pages(tmp_path: Path, status: str) -> Receiver:
    receiver = Receiver(ContainerStore(tmp_path, Runc(tmp_path / "runc"), "b"), tmp_path)
    staging = receiver.root / MIGRATION
    staging.mkdir()
    (staging / PAGES).write_text(status)
    return receiver


def test_destination_answers_once_the_fill_settles(tmp_path: Path) -> None:
    receiver = receiver_with_pages(tmp_path, "transferring")

    async def fill() -> None:
        await asyncio.sleep(0.3)
        (receiver.root / MIGRATION / PAGES).write_text("complete: 3 pages")

    async def ask() -> tuple[str | None, float]:
        receiver.pages_watchers[MIGRATION] = asyncio.create_task(fill())
        started = time.monotonic()
        state = await receiver.state_once_filled(MIGRATION)
        return state.pages, time.monotonic() - started

    pages, waited = asyncio.run(ask())
    assert pages == "complete: 3 pages" and 0.25 < waited < 2


def test_destination_answers_after_the_wait_without_an_outcome(tmp_path: Path) -> None:
    receiver = receiver_with_pages(tmp_path, "transferring")

    async def ask() -> str | None:
        receiver.pages_watchers[MIGRATION] = asyncio.create_task(asyncio.sleep(30))
        state = await receiver.state_once_filled(MIGRATION, wait=0.1)
        receiver.pages_watchers[MIGRATION].cancel()
        return state.pages

    assert asyncio.run(ask()) == "transferring"


class Destination:
    """A fake destination agent answering the page state: transferring, then complete."""

    def __init__(self, protocol: str) -> None:
        self.info = SimpleNamespace(protocol=protocol)
        self.asked: list[tuple[str, float]] = []
        self.answers = ["transferring", "transferring", "complete: 9 pages"]

    async def incoming_pages(self, migration_id: str) -> IncomingState:
        return self.answer("pages")

    async def incoming_state(self, migration_id: str) -> IncomingState:
        return self.answer("state")

    def answer(self, route: str) -> IncomingState:
        self.asked.append((route, time.monotonic()))
        return IncomingState(state=DestinationState.PENDING, pages=self.answers.pop(0))


@pytest.mark.parametrize(("protocol", "route"), [("2.4", "pages"), ("2.3", "state")])
def test_source_waits_on_the_route_its_destination_knows(protocol: str, route: str) -> None:
    """The long poll where the destination has it; either way a quick answer that the
    fill goes on is asked again only PAGES_POLL_S later (no busy loop)."""
    destination = Destination(protocol)
    migration = SourceMigration.__new__(SourceMigration)
    migration.ctx = SimpleNamespace(dest=destination)
    migration.dest_info = destination.info
    migration.options = MigrationOptions(to="b:7451")
    report = MigrationReport(id=MIGRATION, container="c", source="a", destination="b",
                             strategy="stop-and-copy")
    migration.report, migration.events = report, EventStream(report)
    migration.restore_sent_at = time.monotonic()
    asyncio.run(migration.wait_for_pages())
    assert [r for r, _ in destination.asked] == [route] * 3
    gaps = [b - a for (_, a), (_, b) in zip(destination.asked, destination.asked[1:],
                                             strict=False)]
    assert all(gap >= PAGES_POLL_S * 0.9 for gap in gaps), gaps
    assert report.pages == "9 pages"
