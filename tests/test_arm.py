"""The arm step: the destination is armed while the dump is held here when runc's state
tells the container's stdio, one after the other when it does not. Decision logic with a
fake destination and a fake held dump; `Runc.stdio_descriptors` on real state files."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from godwit.errors import GodwitError
from godwit.migration import MigrationOptions
from godwit.migration.report import EventStream, MigrationReport
from godwit.migration.source import SourceMigration
from godwit.protocol import Armed
from godwit.runc import Runc

STDIO = ["/dev/null", "/dev/null", "/dev/null"]
STEP_S = 0.3  # how long the hold and the destination's arm each take


class Destination:
    """A fake destination agent whose arm takes STEP_S; `fail` makes it refuse."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.armed_with: list[str] | None = None
        self.started_at = self.ended_at = 0.0

    async def arm_incoming(self, migration_id: str, descriptors: list[str],
                           **_: object) -> Armed:
        self.started_at = time.monotonic()
        await asyncio.sleep(STEP_S)
        self.ended_at = time.monotonic()
        if self.fail:
            raise GodwitError("b refused the arm")
        self.armed_with = descriptors
        return Armed(armed="c", page_server=None)


class Migration(SourceMigration):
    """A source whose held dump is a sleep that writes runc's descriptors.json."""

    dumped_stdio = STDIO

    async def hold_dump(self) -> SimpleNamespace:
        await asyncio.sleep(STEP_S)
        (self.images / "descriptors.json").write_text(json.dumps(self.dumped_stdio))
        self.held_at = time.monotonic()
        return SimpleNamespace(name="held dump")

    def can_fill_after_restore(self) -> bool:
        return False

    def streams_pages(self) -> bool:
        return False


def source(tmp_path: Path, destination: Destination, stdio: list[str] | None) -> Migration:
    migration = Migration.__new__(Migration)
    runc = SimpleNamespace(stdio_descriptors=lambda name: stdio)
    migration.ctx = SimpleNamespace(dest=destination, store=SimpleNamespace(runc=runc))
    migration.dest_info = None
    migration.options = MigrationOptions(to="b:7451")
    migration.report = MigrationReport(id="0123abcd", container="c", source="a",
                                       destination="b", strategy="stop-and-copy")
    migration.events = EventStream(migration.report)
    migration.images = tmp_path / "images"
    migration.name, migration.held_dump = "c", None
    return migration


def test_the_destination_is_armed_while_the_dump_is_held(tmp_path: Path) -> None:
    destination = Destination()
    migration = source(tmp_path, destination, STDIO)
    started = time.monotonic()
    asyncio.run(migration.arm())
    assert time.monotonic() - started < 1.6 * STEP_S
    assert destination.started_at < migration.held_at
    assert destination.armed_with == STDIO
    assert migration.held_dump.name == "held dump"


def test_without_stdio_in_runc_state_the_arm_follows_the_hold(tmp_path: Path) -> None:
    destination = Destination()
    migration = source(tmp_path, destination, None)
    migration.dumped_stdio = ["pipe:[42]", "/dev/null", "/dev/null"]
    asyncio.run(migration.arm())
    assert destination.started_at >= migration.held_at
    assert destination.armed_with == migration.dumped_stdio


def test_stdio_other_than_the_dump_says_fails_the_arm_and_keeps_the_hold(
        tmp_path: Path) -> None:
    migration = source(tmp_path, Destination(), STDIO)
    migration.dumped_stdio = ["pipe:[42]", "/dev/null", "/dev/null"]
    with pytest.raises(GodwitError, match=r"stdio as \['pipe:\[42\]'"):
        asyncio.run(migration.arm())
    assert migration.held_dump.name == "held dump"  # for the rollback to call off


def test_a_refused_arm_tells_the_destination_and_keeps_the_hold(tmp_path: Path) -> None:
    migration = source(tmp_path, Destination(fail=True), STDIO)
    with pytest.raises(GodwitError, match="b refused the arm"):
        asyncio.run(migration.arm())
    assert migration.held_dump.name == "held dump"


@pytest.mark.parametrize(("state", "expected"), [
    ({"id": "c", "external_descriptors": STDIO}, STDIO),
    ({"id": "c"}, None),
    ({"id": "c", "external_descriptors": [3, None]}, None),
    ("not json", None),
    (None, None),
])
def test_stdio_descriptors_from_runc_state(tmp_path: Path, state: object,
                                           expected: list[str] | None) -> None:
    if state is not None:
        (tmp_path / "c").mkdir()
        text = state if isinstance(state, str) else json.dumps(state)
        (tmp_path / "c" / "state.json").write_text(text)
    assert Runc(tmp_path).stdio_descriptors("c") == expected
