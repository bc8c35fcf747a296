"""A stand-in for the `criu` binary that holds runc's dump or restore request at a gate.

`runc checkpoint` and `runc restore` spend tens of milliseconds before CRIU does any
work: the Go runtime starts, CRIU is run once or twice for a version and a feature check,
images and work directories are opened, the restore bind-mounts the rootfs. godwit starts
them ahead of the freeze with this script installed as `criu` in a directory put first on
their PATH (runc runs the `criu` its PATH finds; `runc --criu` is gone since runc 1.2):
version and feature checks go straight to the real CRIU, but a DUMP or RESTORE request
waits until godwit opens the gate, so only CRIU's own work is left in the freeze.

The script runs as `criu swrk 3` (fd 3 is runc's RPC socket). It peeks at the request
type; other requests exec the real CRIU. For a dump or a restore it starts the real CRIU
at once on a socket of its own (CRIU's exec and library loading, ~4 ms, then happen
before the freeze), connects to the Unix socket named in $GODWIT_CRIU_GATE ("@name":
abstract), says "ready", and waits: on "go" it hands runc's request to CRIU and relays
the rest of the conversation (notifications, passed fds) between runc and CRIU until
CRIU exits, then exits with its status; anything else, or the socket closing, ends CRIU
and the shim with an error so runc gives up cleanly. The real CRIU gets the PATH without
this script's directory. Standard library only: it is installed as a script run by
`python -IS` (see `godwit.runc.install_gate`), which starts in ~10 ms.

With the shim as CRIU's peer, the request's fds CRIU resolves through its peer become the
shim's own. And a container's own network namespace (one runc made, not an external one)
is carried by CRIU: runc always asks CRIU to leave a netns's configuration out
(`empty_ns` with CLONE_NEWNET, "runc doesn't manage network devices"), so that a
restored netns would have nothing, not even `lo` up; the shim takes CLONE_NEWNET out of
`empty_ns`.
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


def _relayed_opts(opts: bytes, own_netns: bool) -> bytes:
    out = bytearray()
    for number, wire, key, value in _fields(opts):
        if own_netns and number == EMPTY_NS_FIELD and wire == 0:
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


def for_relay(request: bytes) -> bytes:
    """runc's request as the shim hands it to CRIU: the fds CRIU resolves through its peer
    are the shim's own, and CLONE_NEWNET is out of opts.empty_ns unless the netns is
    external."""
    own_netns = EXTERNAL_NETNS_KEY not in request
    out = bytearray()
    for number, wire, key, value in _fields(request):
        if number == OPTS_FIELD and wire == 2:
            value = _relayed_opts(value, own_netns)
        out += _encode(wire, key, value)
    return bytes(out)


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


def start_criu(real: str, args: list[str]) -> tuple[socket.socket, int]:
    """The real CRIU, started on a socket of ours where it waits for its request; our end
    and its pid."""
    ours, criu_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        os.dup2(criu_side.fileno(), RPC_FD)  # replaces runc's socket in CRIU
        os.execvp(real, [real, *args])
    criu_side.close()
    return ours, pid


def relay(runc_side: socket.socket, criu: socket.socket) -> None:
    """Pass messages both ways until either end closes."""
    import selectors

    peers = {runc_side: criu, criu: runc_side}
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            selector.register(sock, selectors.EVENT_READ)
        while all(_relay(key.fileobj, peers[key.fileobj])
                  for key, _ in selector.select()):
            pass


def run_gated(real: str, args: list[str], gate: str, kind: str) -> int | str:
    """Start CRIU now, hand it runc's request once godwit opens the gate and relay the
    conversation; CRIU's exit status (a signal as 128+N), or why it did not run."""
    criu, pid = start_criu(real, args)
    if not wait_at_gate(gate):
        criu.close()  # CRIU reads the end of its socket and exits
        os.waitpid(pid, 0)
        return f"godwit: CRIU {kind} called off before it started"
    runc_side = socket.socket(fileno=RPC_FD)
    criu.send(for_relay(runc_side.recv(MAX_MESSAGE)))
    relay(runc_side, criu)
    criu.close()
    runc_side.close()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


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
        if kind:
            sys.exit(run_gated(real, sys.argv[1:], gate, kind))
    os.execvp(real, [real, *sys.argv[1:]])


if __name__ == "__main__":
    main()
