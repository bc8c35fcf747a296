"""A stand-in for the `criu` binary that holds runc's dump or restore request at a gate.

`runc checkpoint` and `runc restore` spend tens of milliseconds before CRIU does any
work: the Go runtime starts, CRIU is run once or twice for a version and a feature check,
images and work directories are opened, the restore bind-mounts the rootfs. godwit starts
them ahead of the freeze with this script installed as `criu` in a directory put first on
their PATH (runc runs the `criu` its PATH finds; `runc --criu` is gone since runc 1.2):
version and feature checks go straight to the real CRIU, but a DUMP or RESTORE request
waits until godwit opens the gate, so only CRIU's own work is left in the freeze.

The script runs as `criu swrk 3` (fd 3 is runc's RPC socket). It peeks at the request
type, and for a dump or a restore connects to the Unix socket named in $GODWIT_CRIU_GATE
("@name": abstract), says "ready", and waits: "go" execs the real CRIU (same pid, same
fds, the request still unread in the socket); anything else, or the socket closing, ends
it with an error so runc gives up cleanly. The real CRIU gets the PATH without this
script's directory. Standard library only: it is installed as a
script run by `python -IS` (see `godwit.runc.install_gate`), which starts in ~10 ms.
"""

from __future__ import annotations

import os
import socket
import sys

GATE_ENV = "GODWIT_CRIU_GATE"
REAL_CRIU_ENV = "GODWIT_CRIU_REAL"
READY, GO = b"ready", b"go"
GATED_REQUESTS = {1: "dump", 2: "restore"}  # criu_req_type values of rpc.proto
RPC_FD = 3


def request_type(rpc_fd: int) -> int:
    """The type of runc's request, read without taking it from the socket: field 1 of
    criu_req, encoded first by protobuf as 0x08 then a one-byte varint."""
    rpc = socket.socket(fileno=rpc_fd)
    try:
        head = rpc.recv(2, socket.MSG_PEEK)
    finally:
        rpc.detach()
    return head[1] if len(head) == 2 and head[0] == 0x08 else 0


def wait_at_gate(path: str) -> bool:
    """Tell godwit the request is waiting; True once it says go."""
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gate:
            gate.connect(address)
            gate.sendall(READY)
            return gate.recv(len(GO)) == GO
    except OSError:
        return False


def path_without(directory: str, path: str) -> str:
    """PATH with `directory` left out."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if d and d != directory)


def main() -> None:
    real = os.environ.get(REAL_CRIU_ENV, "criu")
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    os.environ["PATH"] = path_without(here, os.environ.get("PATH", ""))
    gate = os.environ.get(GATE_ENV)
    if gate and sys.argv[1:] == ["swrk", str(RPC_FD)]:
        kind = GATED_REQUESTS.get(request_type(RPC_FD))
        if kind and not wait_at_gate(gate):
            sys.exit(f"godwit: CRIU {kind} called off before it started")
    os.execvp(real, [real, *sys.argv[1:]])


if __name__ == "__main__":
    main()
