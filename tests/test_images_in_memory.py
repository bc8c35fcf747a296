"""A post-copy destination keeps the dump's images on a tmpfs (protocol 2.7): no file is
created on disk in the freeze. The tmpfs goes with the migration, however it ends."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import copies, wait_for
from faultmatrix import faulty_agent
from memhog_container import (
    failed_post_copy,
    migrate_in_background,
    report_of,
    rootfs_on,
    start_memhog,
    verify,
)

from godwit import procfs, tmpfs
from godwit.lab.testbed import Testbed
from godwit.migration.receiver import Receiver

pytestmark = pytest.mark.integration


def tmpfs_mounts(bed: Testbed, host: str) -> list[str]:
    """The tmpfs mounts under a host's state dir."""
    top = f"{bed.host(host).state_dir}/"
    return [point for point, kind, _ in procfs.mounts()
            if kind == "tmpfs" and point.startswith(top)]


@pytest.mark.parametrize(("strategy", "in_memory"), [("post-copy", True),
                                                      ("stop-and-copy", False)])
def test_the_images_of_a_post_copy_are_kept_in_memory(bed: Testbed, strategy: str,
                                                       in_memory: bool) -> None:
    """While b holds the images (a pause fault), a post-copy's images dir is a tmpfs, a
    stop-and-copy's (its pages land there) is not; the container moves with all its
    memory, and the commit lets the tmpfs go."""
    name = f"tmpfs-{strategy}"
    _, before = start_memhog(bed, name, 64)
    with faulty_agent(bed, "b", "images:pause"):
        migrating = migrate_in_background(bed, name, strategy)
        # the dir is made, then mounted: a post-copy's is waited for until it is a tmpfs
        wait_for(lambda: list(Path(bed.host("b").state_dir).glob("incoming/*/images"))
                 and (tmpfs_mounts(bed, "b") or not in_memory),
                 timeout=30, what="b's staged images dir")
        mounted = tmpfs_mounts(bed, "b")
        report = report_of(migrating, timeout=120)
    assert migrating.returncode == 0 and report["result"] == "ok", report
    assert [Path(point).name for point in mounted] == (["images"] if in_memory else [])
    after = verify(bed, name, rootfs_on(bed, name))
    assert after["ok"] == 1 and after["checksum"] == before["checksum"]
    assert copies(bed, name) == [("b", "running")]
    assert tmpfs_mounts(bed, "b") == []
    bed.godwit("rm", name)


def test_a_failed_post_copy_lets_the_tmpfs_go(bed: Testbed) -> None:
    name = "tmpfs-abort"
    failed_post_copy(bed, name, "restore:error")
    assert tmpfs_mounts(bed, "b") == []
    bed.godwit("rm", name)


def test_release_all_under_detaches_nested_mounts(tmp_path: Path) -> None:
    outer, inner = tmp_path / "outer", tmp_path / "outer" / "inner"
    outer.mkdir()
    tmpfs.mount_tmpfs(outer)
    try:
        inner.mkdir()
        tmpfs.mount_tmpfs(inner)
        assert procfs.fs_type(inner) == "tmpfs"
    finally:
        released = tmpfs.release_all_under(outer)
    assert released == [str(inner), str(outer)]
    assert not tmpfs.release(outer)  # nothing mounted there any more
    assert not os.path.ismount(outer)


def test_the_commit_throws_the_images_tmpfs_away(tmp_path: Path) -> None:
    """A mount cannot be moved to the trash: the commit detaches it first."""
    receiver = Receiver.__new__(Receiver)
    receiver.trash, receiver.watchers = tmp_path / "trash", set()
    (tmp_path / "staging").mkdir()
    images = Receiver._images_dir(tmp_path / "staging", in_memory=True)
    (images / "core-1.img").write_bytes(b"x" * 100)
    assert os.path.ismount(images)

    async def commit() -> None:
        receiver._throw_away(images)
        await asyncio.gather(*receiver.watchers)

    asyncio.run(commit())
    assert not images.exists() and list(receiver.trash.iterdir()) == []
