"""Streaming a file tree between agents (CRIU image directories, container root filesystems).

The sender turns a `TreePlan` into an async iterable of bytes (the body of an HTTP PUT);
the receiver parses that stream into a destination directory, verifying everything.

Modules:

- `wire`: the stream format (framing, record headers and their validation), `TransferError`;
- `manifest`: scans of a tree, their difference (or the difference alone, for a frozen
  pass), and the `TreePlan` of a transfer;
- `send`: the plan as a stream (`send_tree`), read and hashed by a producer thread;
- `receive`: parsing a stream (`receive_tree`, `TreeReceiver`);
- `apply`: applying its records to the destination, one handler per record kind;
- `rules`: what a received tree may hold (byte budget, set-id bits, device nodes);
- `safefs`: file system operations relative to directory fds, for hostile trees.
"""

from godwit.transport.manifest import (
    RACY_NS,
    FileMeta,
    Manifest,
    TreePlan,
    changes_since,
    diff_manifests,
    plan_tree,
    scan_tree,
)
from godwit.transport.receive import TreeReceiver, receive_tree
from godwit.transport.rules import ByteBudget, TreeRules, UploadTooLarge
from godwit.transport.send import TreeStream, send_tree
from godwit.transport.wire import BLAKE3, MAGIC, SHA256, VERSION, TransferError, TransferStats

__all__ = [
    "BLAKE3",
    "MAGIC",
    "RACY_NS",
    "SHA256",
    "VERSION",
    "ByteBudget",
    "FileMeta",
    "Manifest",
    "TransferError",
    "TransferStats",
    "TreePlan",
    "TreeReceiver",
    "TreeRules",
    "TreeStream",
    "UploadTooLarge",
    "changes_since",
    "diff_manifests",
    "plan_tree",
    "receive_tree",
    "scan_tree",
    "send_tree",
]
