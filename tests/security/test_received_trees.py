"""What a destination keeps of a received tree: no more bytes than its budget, no set-id
bits, no device node the policy does not list."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from godwit.transport import (
    ByteBudget,
    TransferError,
    TreeRules,
    UploadTooLarge,
    plan_tree,
    receive_tree,
    send_tree,
)

STRICT = TreeRules(keep_setid=False, device_allowed=lambda kind, major, minor: False)


def transfer(src: Path, dest: Path, rules: TreeRules) -> None:
    asyncio.run(receive_tree(send_tree(plan_tree(src)), dest, rules=rules))


def test_an_upload_past_its_budget_is_cut_before_writing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"x" * 1000)
    (src / "big").write_bytes(bytes(4 << 20))  # zeros: compresses to almost nothing
    dest = tmp_path / "dest"
    with pytest.raises(UploadTooLarge, match=r"larger than announced.*big"):
        transfer(src, dest, TreeRules(budget=ByteBudget(1 << 20)))
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written <= 1 << 20


def test_one_budget_bounds_every_upload_of_a_migration(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(600 << 10))
    budget = ByteBudget(1 << 20)
    transfer(src, tmp_path / "first", TreeRules(budget=budget))
    with pytest.raises(UploadTooLarge):
        transfer(src, tmp_path / "second", TreeRules(budget=budget))


def test_setuid_and_setgid_bits_are_stripped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "su").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "su", 0o6755)
    (src / "shared").mkdir()
    os.chmod(src / "shared", 0o2775)  # a setgid directory only sets the group of new files
    transfer(src, tmp_path / "dest", STRICT)
    assert stat.S_IMODE((tmp_path / "dest" / "su").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "dest" / "shared").stat().st_mode) == 0o2775


def test_a_faithful_copy_keeps_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "su").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "su", 0o4755)
    transfer(src, tmp_path / "dest", TreeRules())
    assert stat.S_IMODE((tmp_path / "dest" / "su").stat().st_mode) == 0o4755


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_device_nodes_are_refused_unless_allowed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    only_null = TreeRules(device_allowed=lambda kind, major, minor: (major, minor) == (1, 3))
    with pytest.raises(TransferError, match="device node blk 8:0 refused"):
        transfer(src, tmp_path / "dest", only_null)
    assert not (tmp_path / "dest" / "sda").exists()
    os.unlink(src / "sda")
    transfer(src, tmp_path / "dest2", only_null)
    assert stat.S_ISCHR((tmp_path / "dest2" / "null").lstat().st_mode)
