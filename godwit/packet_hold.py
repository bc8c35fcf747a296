"""Holding the packets that reach a container's netns while its sockets are being restored.

NFQUEUE in the container netns, bound by a netlink socket of ours: every IPv4 packet
entering the netns waits in the kernel until the restored sockets exist, then all are let
through at once, so TCP peers recover without waiting for their retransmission timeout
(this kernel has no ``plug`` qdisc). The rule that feeds the queue is installed with
``iptables`` in the netns.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time

from godwit.network import CONTAINER_IFNAME, NETNS_DIR, in_netns

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET, _NFQNL_MSG_CONFIG, _NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
_NFQA_PACKET_HDR, _NFQA_VERDICT_HDR = 1, 2
_NFQA_CFG_CMD, _NFQA_CFG_PARAMS, _NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_COPY_META = 1
_NF_ACCEPT = 1
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR = 2
HOLD_QUEUE_MAXLEN = 8192
HOLD_RCVBUF = 16 << 20


class PacketHold:
    """Queue every IPv4 packet entering eth0 of a container netns until :meth:`release`.

    An iptables rule ``raw PREROUTING -i eth0 -j NFQUEUE`` (evaluated before CRIU's own
    filter-table network lock) sends packets to a queue bound by this object's netlink
    socket; the kernel keeps them until the verdict. If the socket closes (agent died,
    :meth:`discard`), queued and further packets are dropped, never answered with a RST:
    TCP peers then retransmit on their timeout. The queue is per netns, so number 0 is fine.
    Only :meth:`release` removes the rule, after the restored sockets exist. Needs
    nfnetlink_queue, xt_NFQUEUE, the raw table, ``iptables`` and ``nsenter``.
    """

    RULE = ("PREROUTING", "-i", CONTAINER_IFNAME, "-j", "NFQUEUE", "--queue-num", "0",
            "-m", "comment", "--comment", "godwit-hold")

    def __init__(self, netns_name_: str) -> None:
        self.netns = netns_name_
        self.sock: socket.socket | None = None
        self.last_id = 0
        self.held = 0
        self.released_at: float | None = None

    def start(self) -> PacketHold:
        """Bind the queue, then install the rule (so nothing is dropped for lack of a reader)."""
        self.sock = in_netns(self.netns, _nfqueue_socket)
        try:
            _nfq_request(self.sock, _NFQNL_MSG_CONFIG, _nla(_NFQA_CFG_CMD,
                         struct.pack("!BxH", _NFQNL_CFG_CMD_BIND, 0)))
            _nfq_request(self.sock, _NFQNL_MSG_CONFIG,
                         _nla(_NFQA_CFG_PARAMS, struct.pack("!IB", 0, _NFQNL_COPY_META))
                         + _nla(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", HOLD_QUEUE_MAXLEN)))
            self._iptables("-I")
        except BaseException:
            self.sock.close()
            self.sock = None
            raise
        return self

    def pending(self) -> int:
        """Packets held so far."""
        self._drain()
        return self.held

    def release(self) -> int:
        """Let every held packet through at once and stop holding; returns how many.

        Also removes a rule left by a hold that died with its agent (a new, unstarted
        :class:`PacketHold` for the same netns)."""
        if self.sock is not None:
            self._drain()
            self._accept_all()
        self.released_at = time.monotonic()
        with contextlib.suppress(subprocess.CalledProcessError):  # no rule: nothing held
            self._iptables("-D")
        if self.sock is not None:
            self._drain()
            self._accept_all()  # packets queued while the rule was being removed
            self._close()
        return self.held

    def discard(self) -> None:
        """Abort: drop what is held and keep dropping (the rule stays, nobody reads the
        queue) until the netns is deleted; a peer never gets a RST from the empty netns."""
        self._close()

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _drain(self) -> None:
        """Read the queue's notifications: count packets, remember the highest id."""
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            for msg_type, payload in _nl_messages(data):
                if msg_type == (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
                    packet_id = _packet_id(payload)
                    if packet_id is not None:
                        self.last_id, self.held = max(self.last_id, packet_id), self.held + 1

    def _accept_all(self) -> None:
        """Batch verdict NF_ACCEPT for every id up to far beyond the last one seen."""
        assert self.sock is not None
        max_id = (self.last_id + (1 << 30)) & 0xFFFFFFFF
        body = _nla(_NFQA_VERDICT_HDR, struct.pack("!II", _NF_ACCEPT, max_id))
        self.sock.send(_nfq_message(_NFQNL_MSG_VERDICT_BATCH, body, ack=False))

    def _iptables(self, action: str) -> None:
        argv = ["nsenter", f"--net={NETNS_DIR / self.netns}", "iptables", "-w", "-t", "raw",
                action, *self.RULE]
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL)


def _nfqueue_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         _NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, HOLD_RCVBUF)  # SO_RCVBUFFORCE
    sock.bind((0, 0))
    return sock


def _nla(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, attr_type) + payload + b"\x00" * (-length % 4)


def _nfq_message(msg_type: int, body: bytes, *, ack: bool, queue: int = 0) -> bytes:
    flags = _NLM_F_REQUEST | (_NLM_F_ACK if ack else 0)
    nfgen = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue)
    header = struct.pack("=IHHII", 16 + len(nfgen) + len(body),
                         (_NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, 0, 0)
    return header + nfgen + body


def _nfq_request(sock: socket.socket, msg_type: int, body: bytes) -> None:
    """Send one config message and wait (2 s at most) for its netlink ack."""
    sock.send(_nfq_message(msg_type, body, ack=True))
    sock.settimeout(2.0)
    try:
        while True:
            for kind, payload in _nl_messages(sock.recv(1 << 16)):
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, f"nfqueue config: {os.strerror(code)}")
                    return
    finally:
        sock.settimeout(None)  # blocking again: _drain reads with MSG_DONTWAIT


def _nl_messages(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while offset + 16 <= len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        out.append((msg_type, data[offset + 16 : offset + length]))
        offset += (length + 3) & ~3
    return out


def _packet_id(payload: bytes) -> int | None:
    offset = 4  # nfgenmsg
    while offset + 4 <= len(payload):
        length, attr_type = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return None
        if attr_type & 0x3FFF == _NFQA_PACKET_HDR:
            return struct.unpack_from("!I", payload, offset + 4)[0]
        offset += (length + 3) & ~3
    return None
