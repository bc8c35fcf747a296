"""Extended attributes in the tree stream: user and trusted ones, POSIX ACLs and file
capabilities travel with every kind of entry, and a destination entry ends with exactly
the source's (protocol 2.9)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from pathlib import Path

import pytest

from godwit.transport import (
    RACY_NS,
    TransferError,
    TreeReceiver,
    TreeRules,
    changes_since,
    plan_tree,
    receive_tree,
    send_tree,
)
from godwit.transport.wire import MAGIC, VERSION, carried_xattr

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="trusted.* and security.capability need root")

# A POSIX ACL as the kernel stores it: version 2, then (tag, permissions, id) entries.
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_READER_1234 = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in (
        (ACL_USER_OBJ, 7, 0xFFFFFFFF), (ACL_USER, 4, 1234), (ACL_GROUP_OBJ, 5, 0xFFFFFFFF),
        (ACL_MASK, 5, 0xFFFFFFFF), (ACL_OTHER, 0, 0xFFFFFFFF)))
# File capabilities (vfs_cap_data, revision 2): effective, permitted cap_net_bind_service.
CAP_NET_BIND_SERVICE = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
ACCESS_ACL = "system.posix_acl_access"


def xattrs_of(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names if carried_xattr(n)}


def all_xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    return {str(p.relative_to(root)): xattrs_of(p) for p in [root, *sorted(root.rglob("*"))]}


def copy(src: Path, dst: Path, paths: list[str] | None = None, deleted: tuple = (),
         rules: TreeRules | None = None) -> None:
    plan = plan_tree(src, paths, deleted)
    kwargs = {"rules": rules} if rules else {}
    asyncio.run(receive_tree(send_tree(plan), dst, **kwargs))


def make_tree(root: Path) -> None:
    (root / "dir").mkdir(parents=True)
    (root / "dir/file").write_bytes(b"data")
    (root / "plain").write_bytes(b"no attributes")
    os.setxattr(root, "user.root", b"at the top")
    os.setxattr(root / "dir", "user.dir", b"")
    os.setxattr(root / "dir/file", "user.mime_type", b"text/plain")
    os.setxattr(root / "dir/file", "user.binary", bytes(range(256)))
    os.setxattr(root / "dir/file", ACCESS_ACL, ACL_READER_1234)
    if ROOT:
        os.symlink("dir/file", root / "link")
        os.mkfifo(root / "fifo")
        os.setxattr(root / "link", "trusted.origin", b"symlink", follow_symlinks=False)
        os.setxattr(root / "fifo", "trusted.origin", b"fifo")
        (root / "server").write_bytes(b"\x7fELF")
        os.chown(root / "server", 1000, 1000)
        os.setxattr(root / "server", "security.capability", CAP_NET_BIND_SERVICE)


def test_extended_attributes_travel_with_every_kind_of_entry(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    copy(src, dst)
    assert all_xattrs(dst) == all_xattrs(src)
    assert xattrs_of(dst / "dir/file")[ACCESS_ACL] == ACL_READER_1234
    assert xattrs_of(dst / "plain") == {}


@needs_root
def test_file_capabilities_survive_the_change_of_owner(tmp_path: Path) -> None:
    """chown drops a file's capabilities: the receiver sets them after the owner."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    copy(src, dst)
    assert (dst / "server").stat().st_uid == 1000
    assert xattrs_of(dst / "server")["security.capability"] == CAP_NET_BIND_SERVICE


@needs_root
def test_file_capabilities_go_with_the_set_id_bits(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    copy(src, dst, rules=TreeRules(keep_setid=False))
    assert "security.capability" not in xattrs_of(dst / "server")
    assert xattrs_of(dst / "dir/file")["user.mime_type"] == b"text/plain"


def test_an_updated_entry_ends_with_exactly_the_source_attributes(tmp_path: Path) -> None:
    """A directory is updated in place: attributes the source dropped go there too; a new
    file does not keep what it inherited from its directory's default ACL."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    os.setxattr(src / "dir", "user.gone", b"soon")
    copy(src, dst)
    os.setxattr(dst / "dir", "system.posix_acl_default", ACL_READER_1234)
    time.sleep(RACY_NS / 1e9 + 0.05)
    first = plan_tree(src).manifest
    os.removexattr(src / "dir", "user.gone")
    (src / "dir/new").write_bytes(b"new")
    changed, deleted = changes_since(first, src)
    assert changed == ["dir", "dir/new"]
    copy(src, dst, changed, deleted)
    assert xattrs_of(dst / "dir") == {"user.dir": b""}
    assert xattrs_of(dst / "dir/new") == {}


def test_an_attribute_change_alone_is_a_change(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"same data")
    time.sleep(RACY_NS / 1e9 + 0.05)
    first = plan_tree(tmp_path).manifest
    os.setxattr(tmp_path / "f", "user.tag", b"new")
    assert changes_since(first, tmp_path) == (["f"], [])


def stream(header: dict) -> bytes:
    """A stream of one directory record with `header`'s fields added."""
    records = [{"type": "dir", "path": "d", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0,
                **header}, {"type": "end", "entries": 1, "files": 0, "bytes": 0}]
    raw = [json.dumps(r).encode() for r in records]
    return MAGIC + bytes([VERSION, 0]) + b"".join(len(r).to_bytes(4, "big") + r for r in raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("xattrs", [
    "user.x", ["user.x"], {"system.nfs4_acl": b64(b"x")}, {"user.\0x": b64(b"x")},
    {"user." + "x" * 300: b64(b"x")}, {"user.x": "not base64!"}, {"user.x": 3},
    {"user.x": b64(bytes(65537))}, {f"user.{i}": "" for i in range(257)}])
def test_malformed_attributes_are_refused(tmp_path: Path, xattrs: object) -> None:
    receiver = TreeReceiver(tmp_path / "dst")
    with pytest.raises(TransferError, match="xattr"):
        receiver.feed(stream({"xattrs": xattrs}))
        receiver.finish()


def test_a_stream_of_an_older_source_has_no_attributes(tmp_path: Path) -> None:
    receiver = TreeReceiver(tmp_path / "dst")
    receiver.feed(stream({}))
    receiver.finish()
    assert xattrs_of(tmp_path / "dst/d") == {}
