"""The tree stream's wire format, version 1: framing, records and their validation.

A stream starts with an 8-byte magic header, never compressed::

    b"GWTREE" | version: u8 (=1) | flags: u8

Flags: bit 0, the rest is one zstd stream; bit 1, the file digests are BLAKE3, else
sha256 (protocol 2.8: a receiver of 2.7 or older refuses the bit, so a source sends sha256
to it).

The rest of the stream (zstd-compressed when bit 0 is set) is a sequence of records::

    record  := header_len: u32 big-endian | header: UTF-8 JSON object (1 .. 1 MiB)
    file    := record | data bytes | digest of the data bytes (32 raw bytes, the trailer)

Header fields by ``type`` (paths and symlink targets are ``os.fsdecode`` strings, so
non-UTF-8 names survive as JSON ``\\udcXX`` escapes):

===========  ===============================================================================
type         fields
===========  ===============================================================================
``dir``      path, mode, uid, gid, mtime_ns          (``path == "."`` is the tree root)
``file``     path, mode, uid, gid, mtime_ns, size, optional ``extents`` ``[[offset, len], ...]``
             (sparse file: only those byte ranges are sent, the rest are holes)
``symlink``  path, uid, gid, mtime_ns, target
``fifo``     path, mode, uid, gid, mtime_ns
``sock``     path, mode, uid, gid, mtime_ns (the name a unix socket is bound to; protocol 2.2)
``chr/blk``  path, mode, uid, gid, mtime_ns, rdev
``hardlink`` path, target (a path of this tree: a regular file already sent or present)
``delete``   path (removed recursively if present; sent before everything else)
``end``      entries (records before it), files (``file`` records), bytes (sum of ``size``)
===========  ===============================================================================

Every record but ``hardlink``, ``delete`` and ``end`` may carry ``xattrs``, an object of
extended attribute names (``user.*``, ``trusted.*``, ``security.*``, and the POSIX ACLs
``system.posix_acl_access`` and ``system.posix_acl_default``) to base64 values; protocol
2.9, an older receiver ignores the field.

``mode`` holds the permission bits only (``& 0o7777``); the file type comes from ``type``.
The data of a ``file`` is ``size`` bytes, or the sum of the extent lengths for a sparse
file. Nothing may follow the ``end`` record.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import blake3

DEVICE_TYPES = ("chr", "blk")  # the node records that carry an rdev

MAGIC = b"GWTREE"
VERSION = 1
FLAG_ZSTD = 0x01
FLAG_BLAKE3 = 0x02
STREAM_HEADER_LEN = len(MAGIC) + 2  # magic, version, flags
LENGTH_LEN = 4  # a record's header length field
MAX_HEADER = 1 << 20
MAX_EXTENTS = 4096  # a file with more data extents is sent dense
MAX_PATH = 4095
# A stream this small is made and applied in the event loop: a worker thread's hand-offs
# cost more than the work (a lazy dump's images, a frozen rootfs's sync).
INLINE_MAX_BYTES = 1 << 20
INLINE_MAX_ENTRIES = 128
DIGEST_LEN = 32  # sha256's and BLAKE3's (default length) alike
# A file's digest: BLAKE3 is ~3.6x cheaper per byte than sha256 here (6.2 against
# 1.7 GB/s), on each side of every transfer; sha256 for receivers older than protocol 2.8.
BLAKE3, SHA256 = "blake3", "sha256"
DEFAULT_DIGEST = BLAKE3

# The extended attributes a tree stream carries: the rest (other system.* names, such as
# an NFSv4 ACL) are not copied.
XATTR_PREFIXES = ("user.", "trusted.", "security.")
XATTR_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
MAX_XATTRS = 256
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536

_UID_MAX = 2**32 - 2
_MTIME_MIN, _MTIME_MAX = -(2**63), 2**63 - 1
_CONTROL = {c: "?" for c in [*range(32), 127]}


class TransferError(Exception):
    """The tree stream is malformed, corrupted, truncated, or could not be applied."""

    def __init__(self, message: str):
        super().__init__(str(message).translate(_CONTROL))  # one line, even for odd names


@dataclass
class TransferStats:
    files: int = 0  # file records (hardlinks not included)
    bytes: int = 0  # file content bytes (logical sizes; holes count)
    wire_bytes: int = 0  # bytes of the stream itself (compressed size if compressed)
    seconds: float = 0.0
    entries: int = 0  # all records but the end record
    # sender only: files that vanished, changed type or shrank between plan and send; what
    # was sent for them is consistent but stale, a later incremental pass resends them.
    unstable: list[str] = field(default_factory=list)


# ---- framing


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


_HASHERS: dict[str, Callable[[], Hasher]] = {SHA256: hashlib.sha256, BLAKE3: blake3.blake3}


def new_hasher(digest: str) -> Hasher:
    """A hasher for the stream's file digests (`SHA256` or `BLAKE3`)."""
    return _HASHERS[digest]()


@dataclass(frozen=True)
class StreamFormat:
    """What a stream's magic header says about the rest of it."""

    compressed: bool
    digest: str


def stream_header(compress: bool, digest: str = DEFAULT_DIGEST) -> bytes:
    if digest not in _HASHERS:
        raise ValueError(f"unknown digest {digest!r}")
    flags = (FLAG_ZSTD if compress else 0) | (FLAG_BLAKE3 if digest == BLAKE3 else 0)
    return MAGIC + bytes([VERSION, flags])


def parse_stream_header(head: bytes) -> StreamFormat:
    """Check the magic header; returns whether the rest is zstd, and the file digest."""
    if head[: len(MAGIC)] != MAGIC:
        raise TransferError("not a godwit tree stream (bad magic)")
    version, flags = head[len(MAGIC)], head[len(MAGIC) + 1]
    if version != VERSION:
        raise TransferError(f"unsupported tree stream version {version}")
    if flags & ~(FLAG_ZSTD | FLAG_BLAKE3):
        raise TransferError(f"unknown tree stream flags {flags:#x}")
    return StreamFormat(bool(flags & FLAG_ZSTD), BLAKE3 if flags & FLAG_BLAKE3 else SHA256)


def encode_record(header: dict) -> bytes:
    js = json.dumps(header, separators=(",", ":")).encode()
    return len(js).to_bytes(LENGTH_LEN, "big") + js


def end_header(stats: TransferStats) -> dict:
    return {"type": "end", "entries": stats.entries, "files": stats.files, "bytes": stats.bytes}


def header_length(field: bytes | memoryview) -> int:
    length = int.from_bytes(field, "big")
    if not 0 < length <= MAX_HEADER:
        raise TransferError(f"malformed stream: header length {length}")
    return length


def decode_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise TransferError(f"malformed header: {e}") from e
    if not isinstance(header, dict):
        raise TransferError("malformed header: not an object")
    return header


def check_end(header: dict, stats: TransferStats) -> None:
    """The end record must count what was received."""
    got = {"entries": stats.entries, "files": stats.files, "bytes": stats.bytes}
    want = {k: header.get(k) for k in got}
    if got != want:
        raise TransferError(f"end record mismatch: stream says {want}, received {got}")


# ---- header fields


def check_path(path: object, *, allow_root: bool = False) -> str:
    """Validate a relative tree path; returns "" for the root ("."). Raises ValueError."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"bad path {path!r}")
    if path == ".":
        if allow_root:
            return ""
        raise ValueError("the tree root is not allowed here")
    if path.startswith("/"):
        raise ValueError(f"absolute path {path!r}")
    if "\0" in path or len(path) > MAX_PATH:
        raise ValueError(f"bad path {path[:200]!r}")
    for part in path.split("/"):
        if part in ("", ".", "..") or len(part) > 255:
            raise ValueError(f"bad path component {part!r} in {path[:200]!r}")
    return path


def header_int(h: dict, key: str, lo: int, hi: int) -> int:
    v = h.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise TransferError(f"malformed header: bad {key} {v!r} for {str(h.get('path'))[:200]!r}")
    return v


def header_mode(h: dict) -> int:
    return header_int(h, "mode", 0, 0o7777)


def header_mtime(h: dict) -> int:
    return header_int(h, "mtime_ns", _MTIME_MIN, _MTIME_MAX)


def header_owner(h: dict) -> tuple[int, int]:
    return header_int(h, "uid", 0, _UID_MAX), header_int(h, "gid", 0, _UID_MAX)


def header_symlink_target(h: dict, rel: str) -> str:
    target = h.get("target")
    if not isinstance(target, str) or not target or "\0" in target or len(target) > MAX_PATH:
        raise TransferError(f"malformed header: bad symlink target for {rel[:200]!r}")
    return target


def header_extents(extents: object, size: int) -> list[tuple[int, int]]:
    """The data ranges of a sparse file: in order, not overlapping, inside `size`."""
    if not isinstance(extents, list) or len(extents) > MAX_EXTENTS:
        raise TransferError("malformed header: bad extents")
    out, end = [], 0
    for e in extents:
        if not _is_extent(e, end, size):
            raise TransferError("malformed header: bad extents")
        out.append((e[0], e[1]))
        end = e[0] + e[1]
    return out


def _is_extent(e: object, end: int, size: int) -> bool:
    return (
        isinstance(e, list)
        and len(e) == 2
        and type(e[0]) is int
        and type(e[1]) is int
        and e[0] >= end
        and e[1] > 0
        and e[0] + e[1] <= size
    )


def carried_xattr(name: str) -> bool:
    """Is this extended attribute part of a copied tree?"""
    return name.startswith(XATTR_PREFIXES) or name in XATTR_ACLS


def encode_xattrs(xattrs: dict[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(value).decode() for name, value in xattrs.items()}


def header_xattrs(h: dict, rel: str) -> dict[str, bytes]:
    """The record's extended attributes ({} when it has none), names and values checked."""
    raw = h.get("xattrs", {})
    if not isinstance(raw, dict) or len(raw) > MAX_XATTRS:
        raise TransferError(f"malformed header: bad xattrs for {rel[:200]!r}")
    return {name: _xattr_value(name, value, rel) for name, value in raw.items()}


def _xattr_value(name: object, value: object, rel: str) -> bytes:
    if not (isinstance(name, str) and 0 < len(name) <= MAX_XATTR_NAME and "\0" not in name
            and carried_xattr(name) and isinstance(value, str)):
        raise TransferError(f"malformed header: bad xattr {str(name)[:80]!r} for {rel[:200]!r}")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise TransferError(f"malformed header: xattr {name} of {rel[:200]!r}: {e}") from e
    if len(data) > MAX_XATTR_VALUE:
        raise TransferError(f"malformed header: xattr {name} of {rel[:200]!r} too large")
    return data
