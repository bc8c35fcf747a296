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

A container's own network namespace (one runc made, not an external one) is carried by
CRIU: runc always asks CRIU to leave a netns's configuration out (`empty_ns` with
CLONE_NEWNET, "runc doesn't manage network devices"), so that a restored netns would
have nothing, not even `lo` up. For such a request the shim takes CLONE_NEWNET out of
`empty_ns`, runs CRIU on a socket of its own with the rewritten request and relays the
rest of the conversation (notifications, passed fds) between runc and CRIU.
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
CLONE_NEWNET = 0x40000000
OPTS_FIELD, EMPTY_NS_FIELD = 2, 38  # criu_req.opts, criu_opts.empty_ns (rpc.proto)
# criu_opts fields CRIU resolves as /proc/<the socket's peer>/fd/N: images_dir_fd,
# work_dir_fd, status_fd. With the shim as CRIU's peer they must be the shim's fds.
PEER_FD_FIELDS = (1, 17, 49)
EXTERNAL_NETNS_KEY = b"extRootNetNS"  # runc's key for an external netns (dump and restore)
MAX_MESSAGE = 1 << 20


def peek_request(rpc_fd: int) -> bytes:
    """runc's whole request, left in the socket."""
    rpc = socket.socket(fileno=rpc_fd)
    try:
        return rpc.recv(MAX_MESSAGE, socket.MSG_PEEK)
    finally:
        rpc.detach()


def request_type(rpc_fd: int) -> int:
    """The type of runc's request, read without taking it from the socket: field 1 of
    criu_req, encoded first by protobuf as 0x08 then a one-byte varint."""
    rpc = socket.socket(fileno=rpc_fd)
    try:
        head = rpc.recv(2, socket.MSG_PEEK)
    finally:
        rpc.detach()
    return head[1] if len(head) == 2 and head[0] == 0x08 else 0


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _fields(data: bytes):
    """(number, wire type, key bytes, value) of each field of a protobuf message; the
    value is an int for a varint, else the bytes after the key."""
    pos = 0
    while pos < len(data):
        key_start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        key_bytes = data[key_start:pos]
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        else:  # fixed 64 / 32 bit
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        yield number, wire, key_bytes, value


def _encode(wire: int, key: bytes, value: int | bytes) -> bytes:
    if wire == 0:
        return key + _encode_varint(value)
    if wire == 2:
        return key + _encode_varint(len(value)) + value
    return key + value


def _opts_carrying_netns(opts: bytes) -> bytes | None:
    if not any(n == EMPTY_NS_FIELD and w == 0 and v & CLONE_NEWNET
               for n, w, _, v in _fields(opts)):
        return None
    out = bytearray()
    for number, wire, key, value in _fields(opts):
        if number == EMPTY_NS_FIELD and wire == 0:
            value &= ~CLONE_NEWNET
            if not value:
                continue
        elif number in PEER_FD_FIELDS and wire == 0 and 0 <= value < 1 << 31:
            value = _own_copy_of_runc_fd(value)
        out += _encode(wire, key, value)
    return bytes(out)


def _own_copy_of_runc_fd(fd: int) -> int:
    """This process's fd for runc's fd `fd` (an O_PATH one: CRIU reopens it by path)."""
    return os.open(f"/proc/{os.getppid()}/fd/{fd}", os.O_PATH)


def carrying_netns(request: bytes) -> bytes | None:
    """runc's request with CLONE_NEWNET out of opts.empty_ns when the netns is the
    container's own; None when there is nothing to change (an external netns, or runc did
    not leave the netns out)."""
    if EXTERNAL_NETNS_KEY in request:
        return None
    out, changed = bytearray(), False
    for number, wire, key, value in _fields(request):
        if number == OPTS_FIELD and wire == 2:
            opts = _opts_carrying_netns(value)
            if opts is not None:
                value, changed = opts, True
        out += _encode(wire, key, value)
    return bytes(out) if changed else None


def _relay(source: socket.socket, target: socket.socket) -> bool:
    """One message (with any fds) from source to target; False at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(source, MAX_MESSAGE, 16)
    if not data and not fds:
        return False
    try:
        socket.send_fds(target, [data], fds)
    finally:
        for fd in fds:
            os.close(fd)
    return True


def run_rewritten(real: str, args: list[str], request: bytes) -> int:
    """Run CRIU on a socket of ours that holds `request`, relay the conversation between
    it and runc's socket, return CRIU's exit code."""
    import selectors

    runc_side = socket.socket(fileno=RPC_FD)
    runc_side.recv(MAX_MESSAGE)  # the original request, peeked so far
    ours, criu_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(request)
    pid = os.fork()
    if pid == 0:
        os.dup2(criu_side.fileno(), RPC_FD)  # replaces runc's socket in CRIU
        os.execvp(real, [real, *args])
    criu_side.close()
    peers = {runc_side: ours, ours: runc_side}
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            selector.register(sock, selectors.EVENT_READ)
        open_ = True
        while open_:
            for key, _ in selector.select():
                if not _relay(key.fileobj, peers[key.fileobj]):
                    open_ = False
    ours.close()
    runc_side.close()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


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
        rewritten = carrying_netns(peek_request(RPC_FD)) if kind else None
        if rewritten is not None:
            code = run_rewritten(real, sys.argv[1:], rewritten)
            sys.exit(128 - code if code < 0 else code)
    os.execvp(real, [real, *sys.argv[1:]])


if __name__ == "__main__":
    main()
