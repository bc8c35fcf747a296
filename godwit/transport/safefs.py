"""File system operations relative to directory fds, for trees that may be hostile.

Paths are resolved one component at a time without following symlinks (a symlinked
component fails with ELOOP/ENOTDIR), so neither a sender reading a running container's
tree nor a receiver applying a stream can be led outside the tree. New entries are made
under a temporary name and renamed into place (`replace_entry`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # errnos of an entry removed or replaced


def open_root(path: Path | str) -> int:
    """fd of a tree's root directory (the caller's own path: symlinks are followed)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class DirFds:
    """Directory fds under a root fd, opened one component at a time without following
    symlinks. Caches the last one."""

    def __init__(self, root_fd: int):
        self.root = root_fd
        self._key = ""
        self._fd = root_fd

    def open(self, rel: str) -> int:
        """fd (O_PATH) of directory `rel` ("" = root). Owned by the cache: do not close."""
        if rel == self._key:
            return self._fd
        if not rel:
            self.invalidate()
            return self.root
        if self._key and rel.startswith(self._key + "/"):
            fd = walk(self._fd, rel[len(self._key) + 1 :])
        else:
            fd = walk(self.root, rel)
        self.invalidate()
        self._key, self._fd = rel, fd
        return fd

    def open_private(self, rel: str) -> int:
        """Like open() but returns an fd the caller must close (or the root fd: check)."""
        return walk(self.root, rel) if rel else self.root

    def invalidate(self) -> None:
        if self._fd != self.root:
            os.close(self._fd)
        self._key, self._fd = "", self.root

    def close(self) -> None:
        self.invalidate()


@contextlib.contextmanager
def tree_dirs(root: Path | str) -> Iterator[DirFds]:
    """`DirFds` of the tree at `root`, closed (root fd included) on exit."""
    root_fd = open_root(root)
    dirs = DirFds(root_fd)
    try:
        yield dirs
    finally:
        dirs.close()
        os.close(root_fd)


def walk(start: int, rel: str) -> int:
    """O_PATH fd of directory `rel` below `start`, never following a symlink."""
    fd = start
    try:
        for part in rel.split("/") if rel else ():
            nfd = os.open(part, DIR_PATH, dir_fd=fd)
            if fd != start:
                os.close(fd)
            fd = nfd
    except BaseException:
        if fd != start:
            os.close(fd)
        raise
    return fd


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """lstat() of `name` in `dir_fd`, None if there is no such entry."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def lstat_with_target(dir_fd: int, name: str) -> tuple[os.stat_result, str | None]:
    """lstat() of `name` and, for a symlink, its target."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return st, os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None


def same_inode(a: os.stat_result | None, b: os.stat_result) -> bool:
    return a is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
    """(read fd, fstat) of `name` if it is a regular file, else None. Never open()s
    anything else: a device node swapped into a running container's tree would be opened
    outside its cgroup. OSError for other failures than a vanished entry."""
    pfd = -1
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC), st  # this inode
    except OSError as e:
        if e.errno in GONE:
            return None
        raise
    finally:
        if pfd >= 0:
            os.close(pfd)


def data_extents(fd: int, size: int, max_extents: int) -> list[tuple[int, int]] | None:
    """Data ranges of a sparse file; None to send it dense (too many ranges, or the file
    system cannot tell)."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size and (start := _next_data(fd, pos)) < size:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            if len(out) > max_extents:
                return None
            pos = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return out


def _next_data(fd: int, pos: int) -> int:
    """Offset of the next data at or after `pos`; the maximum offset if only a hole follows."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return 2**63 - 1
        raise


def create_temp_file(dir_fd: int, tmp: str) -> int:
    """A new, empty, private file `tmp` (which must not exist), open for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o600, dir_fd=dir_fd)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def replace_entry(dir_fd: int, tmp: str, name: str) -> None:
    """Rename tmp over name, replacing whatever is there (a directory recursively); on
    failure tmp is removed."""
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except IsADirectoryError:
        remove_entry(dir_fd, name)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove `name` (a directory with its subtree) if it exists."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def ensure_dir(dir_fd: int, name: str) -> None:
    """`name` is a directory afterwards: kept if it is one, else replaced by a new one (0o700)."""
    st = lstat_at(dir_fd, name)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        st = None
    if st is None:
        os.mkdir(name, 0o700, dir_fd=dir_fd)


def set_mode_mtime(fd: int, mode: int, mtime_ns: int) -> None:
    os.fchmod(fd, mode)
    os.utime(fd, ns=(mtime_ns, mtime_ns))


def set_dir_mode_mtime(parent_fd: int, name: str, mode: int, mtime_ns: int) -> None:
    """Mode and mtime of directory `name` (opened without following a symlink)."""
    fd = os.open(name, DIR_READ, dir_fd=parent_fd)
    try:
        set_mode_mtime(fd, mode, mtime_ns)
    finally:
        os.close(fd)


# ---- extended attributes: os.*xattr take no dir_fd, so an entry is named through /proc


def entry_path(dir_fd: int, name: str) -> str:
    """A path to `name` in directory `dir_fd` for calls without dir_fd (pass them
    follow_symlinks=False so that `name` itself is not followed)."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def get_xattrs(target: int | str, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The `wanted` extended attributes of an open file (fd) or an `entry_path`; {} where
    the file system has none. One removed meanwhile is left out."""
    follow = _not_following(target)
    try:
        names = os.listxattr(target, **follow)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return {}
        raise
    found = {}
    for name in filter(wanted, names):
        try:
            found[name] = os.getxattr(target, name, **follow)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return found


def set_xattrs(target: int | str, xattrs: dict[str, bytes],
               stale: Callable[[str], bool]) -> None:
    """Set `xattrs` on an open file (fd) or an `entry_path`, first removing the attributes
    `stale` names that `xattrs` does not have (inherited, or left from an earlier copy)."""
    follow = _not_following(target)
    for name in os.listxattr(target, **follow):
        if stale(name) and name not in xattrs:
            os.removexattr(target, name, **follow)
    for name, value in xattrs.items():
        os.setxattr(target, name, value, **follow)


def _not_following(target: int | str) -> dict[str, bool]:
    """The *xattr keyword for `target`: a path's last component is not followed (an fd
    takes no such keyword)."""
    return {} if isinstance(target, int) else {"follow_symlinks": False}
