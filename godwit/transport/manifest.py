"""What a transfer sends: scans of a tree (`Manifest`), their difference, and the plan.

Incremental sync: `scan_tree` takes a `Manifest`, `diff_manifests` compares two of them
and `plan_tree(root, changed, deleted)` sends only what changed plus ``delete`` records.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from godwit.transport.safefs import DIR_READ, GONE, DirFds, lstat_with_target, open_root, tree_dirs
from godwit.transport.wire import DEVICE_TYPES, check_path

# A manifest entry changed less than this before its scan may change again within the
# same timestamp tick without a visible difference: it is always treated as changed.
RACY_NS = 100_000_000

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",  # the name a unix socket was bound to: CRIU expects to find it
}


@dataclass(frozen=True, slots=True)
class FileMeta:
    """lstat() of one tree entry. `nlink` is informational (ctime covers link changes)."""

    type: str  # file | dir | symlink | fifo | chr | blk | sock
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # permission bits only
    uid: int
    gid: int
    target: str | None = None  # symlink target
    rdev: int = 0
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino)
    nlink: int = field(default=1, compare=False)


class Manifest(dict[str, FileMeta]):
    """path ("." for the root) -> FileMeta, plus the wall-clock time the scan started."""

    def __init__(self, entries: Iterable[tuple[str, FileMeta]] = (), scanned_ns: int = 0):
        super().__init__(entries)
        self.scanned_ns = scanned_ns


@dataclass
class TreePlan:
    """What `send_tree` will send: entries in order (parents first) and paths to delete."""

    root: Path
    entries: list[tuple[str, FileMeta]]
    deleted: list[str]
    total_bytes: int  # file content bytes, each inode once (progress total)
    manifest: Manifest | None = None  # the scan behind a full plan: "old" for the next diff

    @property
    def files(self) -> int:
        return sum(1 for _, m in self.entries if m.type == "file")


def file_meta(st: os.stat_result, target: str | None) -> FileMeta | None:
    """The manifest entry of an lstat() result; None for what cannot be transferred."""
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:  # whiteouts
        return None
    return FileMeta(
        type=kind,
        size=st.st_size if kind == "file" else 0,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        target=target,
        rdev=st.st_rdev if kind in DEVICE_TYPES else 0,
        inode=(st.st_dev, st.st_ino),
        nlink=st.st_nlink,
    )


# ---- scans


def scan_tree(root: Path | str, started_ns: int | None = None) -> Manifest:
    """lstat every entry under `root` (never following symlinks). `started_ns`: the time
    the scan counts from when something it depends on ran before it (default: now)."""
    manifest = Manifest(scanned_ns=time.time_ns() if started_ns is None else started_ns)

    def add(path: str, st: os.stat_result, dir_fd: int, name: str) -> None:
        try:
            target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
        except FileNotFoundError:
            return  # raced with a deletion
        if (meta := file_meta(st, target)) is not None:
            manifest[path] = meta

    _walk(root, add)
    return manifest


def changes_since(old: Manifest, root: Path | str) -> tuple[list[str], list[str]]:
    """`diff_manifests(old, scan_tree(root))`, made without building an entry for what did
    not change: the rootfs's frozen pass, where every millisecond is downtime."""
    racy = old.scanned_ns - RACY_NS
    changed, seen = [], set()

    def compare(path: str, st: os.stat_result, dir_fd: int, name: str) -> None:
        if stat.S_IFMT(st.st_mode) not in _KINDS:
            return  # not in a scan either
        prev = old.get(path)
        try:
            same = (prev is not None and max(prev.ctime_ns, prev.mtime_ns) < racy
                    and _unchanged(prev, st, dir_fd, name))
        except FileNotFoundError:
            return  # raced with a deletion
        seen.add(path)
        if not same:
            changed.append(path)

    _walk(root, compare)
    return sorted(changed), _top_most(p for p in old if p not in seen)


def _unchanged(prev: FileMeta, st: os.stat_result, dir_fd: int, name: str) -> bool:
    """Would `file_meta` of this lstat (and link target) equal `prev`?"""
    kind = _KINDS[stat.S_IFMT(st.st_mode)]
    return (prev.type == kind and prev.mtime_ns == st.st_mtime_ns
            and prev.ctime_ns == st.st_ctime_ns
            and prev.size == (st.st_size if kind == "file" else 0)
            and prev.mode == stat.S_IMODE(st.st_mode)
            and prev.uid == st.st_uid and prev.gid == st.st_gid
            and prev.rdev == (st.st_rdev if kind in DEVICE_TYPES else 0)
            and prev.inode == (st.st_dev, st.st_ino)
            and (kind != "symlink" or prev.target == os.readlink(name, dir_fd=dir_fd)))


# visit(path, lstat, fd of its directory, name): called for each entry of a walk
Visit = Callable[[str, os.stat_result, int, str], None]


def _walk(root: Path | str, visit: Visit) -> None:
    """Visit every entry under `root`, "." first, then each directory's entries before its
    subdirectories'; never following symlinks, skipping what is removed meanwhile."""
    root_fd = open_root(root)
    try:
        visit(".", os.fstat(root_fd), root_fd, ".")
        _walk_dir(root_fd, "", visit)
    finally:
        os.close(root_fd)


def _walk_dir(fd: int, prefix: str, visit: Visit) -> None:
    with os.scandir(fd) as it:
        listed = list(it)
    subdirs = []
    for e in listed:
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # raced with a deletion
        path = prefix + e.name
        visit(path, st, fd, e.name)
        if stat.S_ISDIR(st.st_mode):
            subdirs.append((e.name, path))
    for name, path in subdirs:
        try:
            sub = os.open(name, DIR_READ, dir_fd=fd)
        except OSError as e:
            if e.errno in GONE:
                continue  # replaced or removed since the lstat
            raise
        try:
            _walk_dir(sub, path + "/", visit)
        finally:
            os.close(sub)


def diff_manifests(old: Manifest, new: Manifest) -> tuple[list[str], list[str]]:
    """(changed, deleted) between two scans of one tree, both sorted.

    changed: paths of `new` that are new or whose metadata differs (content changes show
    as mtime/ctime/size changes), plus entries changed too shortly before the `old` scan to
    be trusted (a later change in the same timestamp tick would be invisible). All links
    of a hardlink group share one inode, hence one ctime: when one is changed (including
    adding or removing a link) all are, and the receiver rebuilds the group.
    deleted: paths of `old` missing from `new`, reduced to the top-most ones (deleting a
    directory removes its subtree).
    """
    racy = getattr(old, "scanned_ns", 0) - RACY_NS
    changed = [
        path
        for path, meta in new.items()
        if (prev := old.get(path)) is None
        or prev != meta
        or max(prev.ctime_ns, prev.mtime_ns) >= racy
    ]
    return sorted(changed), _top_most(p for p in old if p not in new)


def _top_most(paths: Iterable[str]) -> list[str]:
    """Sorted paths without those that have an ancestor in the set."""
    pset = set(paths)
    out = []
    for p in sorted(pset):
        head = p
        while "/" in head:
            head = head.rpartition("/")[0]
            if head in pset:
                break
        else:
            out.append(p)
    return out


# ---- plans


def plan_tree(
    root: Path | str, paths: Iterable[str] | None = None, deleted: Iterable[str] = (),
    started_ns: int | None = None,
) -> TreePlan:
    """Plan a transfer of `root`: the whole tree (paths=None, scanned as by `scan_tree`)
    or only `paths` plus `deleted` records. Paths of `paths` that no longer exist become
    deletions."""
    root = Path(root)
    dels = {check_path(p) for p in deleted}
    manifest = None
    if paths is None:
        manifest = scan_tree(root, started_ns)
        entries = sorted(manifest.items())
    else:
        entries = _stat_paths(root, paths, dels)
    sent = {p for p, _ in entries}
    return TreePlan(root, entries, _top_most(dels - sent), _content_bytes(entries), manifest)


def _stat_paths(root: Path, paths: Iterable[str], gone: set[str]) -> list[tuple[str, FileMeta]]:
    """Sorted manifest entries of `paths`; those that no longer exist are added to `gone`."""
    entries = []
    with tree_dirs(root) as dirs:
        for p in sorted(set(paths)):
            rel = check_path(p, allow_root=True)
            try:
                st, target = _lstat_rel(dirs, rel)
            except OSError as e:
                if e.errno not in GONE:
                    raise
                gone.add(rel)
                continue
            meta = file_meta(st, target)
            if meta is not None:
                entries.append((rel or ".", meta))
    return entries


def _lstat_rel(dirs: DirFds, rel: str) -> tuple[os.stat_result, str | None]:
    if not rel:
        return os.fstat(dirs.root), None
    head, _, name = rel.rpartition("/")
    return lstat_with_target(dirs.open(head), name)


def _content_bytes(entries: list[tuple[str, FileMeta]]) -> int:
    """Sum of the file sizes, each inode once (hardlinks)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for _, m in entries:
        if m.type == "file" and m.inode not in seen:
            seen.add(m.inode)
            total += m.size
    return total
