"""The dump's images go as the body of the restore request to a destination of protocol
2.6 or later (`POST /v1/incoming/{id}/restore-images`), as an upload then a restore to an
older one. The source's decision logic and the fence's clock, with a fake peer."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from godwit.containers import ContainerStore
from godwit.errors import Conflict
from godwit.migration import MigrationOptions
from godwit.migration.receiver import STATE, Receiver
from godwit.migration.report import EventStream, MigrationReport
from godwit.migration.source import SourceMigration
from godwit.migration.states import DestinationState, Stage
from godwit.protocol import Restored, Uploaded
from godwit.runc import Runc
from godwit.transport.receive import receive_tree

MIGRATION = "0123abcd"


class Destination:
    """A fake destination agent: receives trees into `root`, records its calls."""

    def __init__(self, protocol: str, root: Path) -> None:
        self.info = SimpleNamespace(protocol=protocol)
        self.root = root
        self.calls: list[str] = []
        self.body_done_at = 0.0

    async def received(self, what: str, body) -> None:
        await receive_tree(body, self.root / what)
        self.body_done_at = time.monotonic()

    async def upload(self, migration_id: str, what: str, body) -> Uploaded:
        self.calls.append(f"upload {what}")
        await self.received(what, body)
        return Uploaded(files=0, bytes=0, wire_bytes=0, seconds=0.0)

    async def restore_incoming(self, migration_id: str, body) -> Restored:
        self.calls.append("restore")
        return Restored(restored_at=time.time(), held_packets=0, pid=1)

    async def restore_with_images(self, migration_id: str, body) -> Restored:
        self.calls.append("restore with images")
        await asyncio.sleep(0.2)  # a slow link: the body ends well after the request began
        await self.received("images", body)
        await asyncio.sleep(0.05)  # the restore itself
        return Restored(restored_at=time.time(), held_packets=0, pid=1)


def frozen_migration(tmp_path: Path, destination: Destination) -> SourceMigration:
    """A source migration past its dump: CRIU's images in its work dir."""
    migration = SourceMigration.__new__(SourceMigration)
    journals = SimpleNamespace(save=lambda journal, durable=True: None)
    migration.ctx = SimpleNamespace(dest=destination, journals=journals)
    migration.dest_info = destination.info
    migration.options = MigrationOptions(to="b:7451")
    report = MigrationReport(id=MIGRATION, container="c", source="a", destination="b",
                             strategy="stop-and-copy", frozen_at=time.time())
    migration.report, migration.events = report, EventStream(report)
    migration.journal = SimpleNamespace(stage=Stage.FROZEN, extra={})
    migration.images = tmp_path / "images"
    migration.images.mkdir()
    for name in ("inventory.img", "core-1.img", "pagemap-1.img"):
        (migration.images / name).write_bytes(os.urandom(2000))
    return migration


@pytest.mark.parametrize(("protocol", "calls"), [
    ("2.6", ["restore with images"]),
    ("2.5", ["upload images", "restore"]),
])
def test_images_go_with_the_restore_where_the_destination_takes_them(
        tmp_path: Path, protocol: str, calls: list[str]) -> None:
    destination = Destination(protocol, tmp_path / "b")
    migration = frozen_migration(tmp_path, destination)
    sent = sorted(p.name for p in migration.images.iterdir())
    asyncio.run(migration.send_images_and_restore())
    assert destination.calls == calls
    assert sorted(p.name for p in (destination.root / "images").iterdir()) == sent
    assert migration.stage == Stage.RESTORED
    assert not migration.images.exists(), "the local copy goes once sent"
    assert migration.report.image_bytes == 3 * 2000
    assert [p.name for p in migration.report.phases] == ["images", "restore"]


def test_the_fence_clock_starts_once_the_images_are_all_sent(tmp_path: Path) -> None:
    """The destination restores, and arms its fence, only after the whole body: the
    source's fence deadline counts from then, not from the request's start."""
    destination = Destination("2.6", tmp_path / "b")
    migration = frozen_migration(tmp_path, destination)
    asyncio.run(migration.send_images_and_restore())
    assert migration.restore_sent_at is not None
    assert migration.restore_sent_at >= destination.body_done_at - 0.01
    assert migration.restore_sent_at < migration.restored_at


def test_a_restored_migration_takes_no_more_images(tmp_path: Path) -> None:
    """A repeated restore-images after the restore is refused before anything is written:
    the restore's lazy-pages daemon may still read the images there."""
    receiver = Receiver(ContainerStore(tmp_path, Runc(tmp_path / "runc"), "b"), tmp_path)
    staging = receiver.root / MIGRATION
    staging.mkdir()
    (staging / STATE).write_text(DestinationState.PENDING.value)

    async def body():
        pytest.fail("the body was read")
        yield b""

    with pytest.raises(Conflict, match="already restored"):
        asyncio.run(receiver.restore_with_images(MIGRATION, body()))
    assert not (staging / "images").exists()
