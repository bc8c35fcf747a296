"""The rootfs's frozen pass: `changes_since(old, root)` must give exactly what a full
scan and `diff_manifests` give, on any tree and any set of changes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from godwit.transport import RACY_NS, Manifest, changes_since, diff_manifests, scan_tree

NAMES = st.sampled_from(["a", "b", "c", "d/e", "d/f", "d/g/h", "i/j"])
KINDS = ["file", "dir", "symlink", "fifo", "chr", "hardlink"]
CHANGES = ["append", "chmod", "chown", "retarget", "remove", "replace", "utime", "link",
           "rename"]


def make(root: Path, name: str, kind: str) -> None:
    """Create `name` (and its parents) as `kind`, unless something is there already."""
    path = root / name
    if os.path.lexists(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_bytes(os.urandom(len(name) * 100))
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(f"target-of-{name}")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "chr":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    else:  # a second link to a file of the tree
        first = root / "linked"
        if not first.exists():
            first.write_bytes(b"linked")
        os.link(first, path)


def change(root: Path, name: str, how: str) -> None:
    """Change `name` in one way, if it exists and the change applies to its kind."""
    path = root / name
    if not os.path.lexists(path):
        return
    is_link, is_dir = path.is_symlink(), path.is_dir() and not path.is_symlink()
    if how == "append" and path.is_file() and not is_link:
        with open(path, "ab") as f:
            f.write(b"more")
    elif how == "chmod" and not is_link:
        os.chmod(path, 0o640)
    elif how == "chown":
        os.lchown(path, 1234, 1234)
    elif how == "retarget" and is_link:
        path.unlink()
        path.symlink_to("elsewhere")
    elif how == "remove":
        shutil.rmtree(path) if is_dir else path.unlink()
    elif how == "replace" and not is_dir:
        path.unlink()
        path.mkdir()
    elif how == "utime":
        os.utime(path, ns=(1, 1), follow_symlinks=False)
    elif how == "link" and path.is_file() and not is_link and not (root / "more").exists():
        os.link(path, root / "more")
    elif how == "rename" and not os.path.lexists(root / "renamed"):
        path.rename(root / "renamed")


def not_racy(manifest: Manifest) -> Manifest:
    """The same scan, taken long enough after its entries' last changes to trust them."""
    return Manifest(manifest.items(), scanned_ns=manifest.scanned_ns + 10 * RACY_NS)


@settings(max_examples=150, deadline=None)
@given(tree=st.lists(st.tuples(NAMES, st.sampled_from(KINDS)), max_size=8),
       changes=st.lists(st.tuples(NAMES, st.sampled_from(CHANGES)), max_size=6),
       trusted=st.booleans())
def test_the_frozen_pass_finds_what_a_full_scan_does(tree, changes, trusted) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, kind in tree:
            make(root, name, kind)
        old = scan_tree(root)
        if trusted:
            old = not_racy(old)
        for name, how in changes:
            change(root, name, how)
        assert changes_since(old, root) == diff_manifests(old, scan_tree(root))


def test_nothing_changed_is_nothing_to_send(tmp_path: Path) -> None:
    for name in ("a", "d/e", "d/g/h"):
        make(tmp_path, name, "file")
    make(tmp_path, "s", "symlink")
    old = not_racy(scan_tree(tmp_path))
    assert changes_since(old, tmp_path) == ([], [])


PERTURBED = {"type": "fifo", "size": 1, "mtime_ns": 1, "ctime_ns": 1, "mode": 0o7777,
             "uid": 4321, "gid": 4321, "target": "stale", "rdev": 99, "inode": (0, 1)}


@pytest.mark.parametrize("field", sorted(PERTURBED))
def test_every_field_of_an_entry_counts(tmp_path: Path, field: str) -> None:
    """The old entry differs in `field` alone (whatever the file system would change with
    it): the frozen pass reports it, as comparing entries does."""
    make(tmp_path, "s", "symlink")
    old = not_racy(scan_tree(tmp_path))
    old["s"] = dataclasses.replace(old["s"], **{field: PERTURBED[field]})
    assert changes_since(old, tmp_path) == (["s"], []) == diff_manifests(old, scan_tree(tmp_path))


def test_a_link_count_alone_does_not_count(tmp_path: Path) -> None:
    """`nlink` is informational (the ctime covers a link made or removed)."""
    make(tmp_path, "f", "file")
    old = not_racy(scan_tree(tmp_path))
    old["f"] = dataclasses.replace(old["f"], nlink=7)
    assert changes_since(old, tmp_path) == ([], [])
