"""The testbeds' own filesystem (godwit.lab.labfs): a fresh journaled ext4 on a loop device
with direct I/O, where the hosts keep their state, gone when the testbed closes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import wait_for

from godwit.lab import labfs
from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, losetup)")
pytestmark = pytest.mark.integration


def filesystem_of(path: Path) -> tuple[str, str]:
    """(type, source) of the filesystem holding `path`."""
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], out[1]


def ext4_features(device: str) -> list[str]:
    out = subprocess.run(["tune2fs", "-l", device], capture_output=True, text=True,
                         check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("Filesystem features:"))
    return line.split(":", 1)[1].split()


def loop_flags(device: str) -> list[str]:
    """The loop device's direct-I/O and autoclear flags, as "1" or "0"."""
    return subprocess.run(["losetup", "-n", "-O", "DIO,AUTOCLEAR", device], capture_output=True,
                          text=True, check=True).stdout.split()


def given_back(image: Path, used_blocks: int) -> bool:
    """Whether the image is back within 8 MiB of `used_blocks` after a deletion. ext4 sends a
    commit's discards from a work queue, after `sync()` returns, and the loop device then
    punches them out of the image: the caller polls."""
    os.sync()
    return image.stat().st_blocks - used_blocks < (8 << 20) // 512


@root_only
def test_mount_gives_a_journaled_ext4_on_a_direct_io_loop_device(tmp_path: Path) -> None:
    mountpoint, image = tmp_path / "hosts", tmp_path / "lab.img"
    labfs.mount_journaled(mountpoint, image)
    try:
        fstype, device = filesystem_of(mountpoint)
        assert (fstype, device) == ("ext4", labfs.loop_device(mountpoint))
        assert device.startswith("/dev/loop")
        assert "has_journal" in ext4_features(device)
        assert loop_flags(device) == ["1", "1"]  # no second page cache; detached at umount
        assert image.stat().st_blocks * 512 < labfs.IMAGE_BYTES // 64  # sparse
        used = image.stat().st_blocks
        (mountpoint / "big").write_bytes(os.urandom(64 << 20))
        os.sync()
        assert image.stat().st_blocks - used >= (64 << 20) // 512
        (mountpoint / "big").unlink()
        wait_for(lambda: given_back(image, used), timeout=30,
                 what="the deleted file's blocks to leave the image")
    finally:
        labfs.unmount(mountpoint, image)
    assert not mountpoint.exists() and not image.exists()
    labfs.unmount(mountpoint, image)  # idempotent


@root_only
def test_each_mount_starts_from_an_empty_filesystem(tmp_path: Path) -> None:
    mountpoint, image = tmp_path / "hosts", tmp_path / "lab.img"
    image.write_bytes(b"not a filesystem" * 4096)
    labfs.mount_journaled(mountpoint, image)
    try:
        assert sorted(p.name for p in mountpoint.iterdir()) == ["lost+found"]
        (mountpoint / "state").write_text("left by an earlier run")
        labfs.mount_journaled(mountpoint, image)  # mounted already: kept as it is
        assert (mountpoint / "state").exists()
    finally:
        labfs.unmount(mountpoint, image)


@root_only
def test_a_testbed_keeps_its_hosts_state_on_its_own_journaled_ext4() -> None:
    prefix = f"gwf{os.getpid() % 100000}"
    with Testbed(["a"], prefix=prefix, subnet=pick_free_subnet()) as bed:
        state_dir = bed.host("a").state_dir
        fstype, device = filesystem_of(state_dir)
        assert fstype == "ext4" and device.startswith("/dev/loop")
        assert "has_journal" in ext4_features(device)
        assert bed.fs_image.exists()
    assert not bed.net.base_dir.exists() and not bed.fs_image.exists()
