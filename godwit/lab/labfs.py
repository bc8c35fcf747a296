"""A testbed's own filesystem: a journaled ext4 on a loop device, as a production host has.

This VM's root filesystem is ext4 without a journal. There ext4 does not hand out an inode
freed in the last 30 seconds (`recently_deleted()` in fs/ext4/ialloc.c): every file
created after many deletions first passes over them. The lab deletes and creates files
all the time (each migration writes a rootfs, CRIU's images and runc's state just after
the previous one deleted as many; memhog replaces its state file every 10 ms), so there
creating 287 symlinks took 17 to 143 ms, against 4 to 5 ms on a journaled ext4 (4 December
2026). A testbed therefore keeps its hosts' state on a fresh journaled ext4 of its own:
a sparse image file, attached with direct I/O (no second page cache) and mounted with
`discard`, so that what the lab deletes leaves the image too (one benchmark run without it
grew the image to 13 GiB); gone at its close.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from godwit import tmpfs

IMAGE_BYTES = 64 << 30  # sparse: only what is written takes disk space


class LabFsError(RuntimeError):
    """The lab filesystem could not be made or mounted."""


def mount_journaled(mountpoint: Path, image: Path) -> None:
    """A fresh journaled ext4 in `image`, mounted at `mountpoint` (kept if mounted)."""
    if os.path.ismount(mountpoint):
        return
    image.unlink(missing_ok=True)
    with open(image, "wb") as sparse:
        sparse.truncate(IMAGE_BYTES)
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
        _run(["mount", "-o", "loop,discard", str(image), str(mountpoint)])
    except LabFsError:
        image.unlink(missing_ok=True)
        raise
    _run(["losetup", "--direct-io=on", loop_device(mountpoint)])


def unmount(mountpoint: Path, image: Path) -> None:
    """Unmount (detached, if something still holds it; the loop device goes with the last
    user), remove the mount point and the image; idempotent."""
    tmpfs.release(mountpoint)  # detaches any mount, not only a tmpfs
    with contextlib.suppress(OSError):
        mountpoint.rmdir()
    image.unlink(missing_ok=True)


def loop_device(mountpoint: Path) -> str:
    """The block device mounted at `mountpoint`."""
    return _run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(mountpoint)]).strip()


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise LabFsError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise LabFsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout
