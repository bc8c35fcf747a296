"""Throwaway etcd v3 members on this machine, with TLS from a godwit CA.

`EtcdCluster(ca, size=1)` is a single node, `size=3` a 3-member cluster (for failure tests).
Every member is Debian's `etcd` binary (scripts/setup installs etcd-server), runs in the
root network namespace with its own data dir under /var/tmp and its own client and peer
ports, picked free on its address below the ephemeral range. Bind it on a testbed's bridge
address (`HostNetwork.gateway`) and the agents in the netns hosts reach it through their
default route. The members' certificates name that address and `etcd.godwit`, the name clients
check (godwit.cluster.store). All members share the address: etcd refuses a peer whose
certificate's IP addresses do not include the address the connection comes from, and on
one machine every connection between loopback addresses comes from 127.0.0.1. Clients and peers
both need a certificate of the CA (`--client-cert-auth`, `--peer-client-cert-auth`) and the
CA's CRL applies to clients.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from godwit.cluster.store import SERVER_NAME
from godwit.lab.resource import Resource
from godwit.pki import CertificateAuthority, PKIError
from godwit.tls import TLSFiles, client_context

ETCD_BINARY = "etcd"
START_TIMEOUT_S = 20
PORTS_FROM = 20000  # members take ports from here up to the ephemeral range


@dataclass
class EtcdMember:
    """One member: its name, ports, data dir, TLS files and process (None when stopped)."""

    name: str
    address: str
    client_port: int
    peer_port: int
    data_dir: Path
    tls: TLSFiles
    log: Path
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """`host:port` of its client URL."""
        return f"{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{self.peer_port}"

    def argv(self, initial_cluster: str, token: str) -> list[str]:
        client_url = f"https://{self.endpoint}"
        return [
            ETCD_BINARY, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            "--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
            "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth",
            "--client-crl-file", str(self.tls.crl),
            "--peer-cert-file", str(self.tls.cert), "--peer-key-file", str(self.tls.key),
            "--peer-trusted-ca-file", str(self.tls.ca), "--peer-client-cert-auth",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]


class EtcdCluster(Resource):
    """`with EtcdCluster(ca, size=3) as etcd:` runs the members; everything goes at exit."""

    def __init__(self, ca: CertificateAuthority, *, size: int = 1, address: str = "127.0.0.1",
                 prefix: str = "gwe") -> None:
        if size < 1:
            raise ValueError("an etcd cluster has at least one member")
        self.ca = ca
        self.size = size
        self.address = address
        self.prefix = prefix
        self.work = Path(tempfile.mkdtemp(prefix=f"godwit-etcd-{prefix}-", dir="/var/tmp"))
        self.members: list[EtcdMember] = []
        self.client_tls: TLSFiles | None = None

    @property
    def endpoints(self) -> list[str]:
        """Every member's `host:port`, running or not."""
        return [m.endpoint for m in self.members]

    @property
    def urls(self) -> str:
        """The members' client URLs, comma-separated (the agent's `--etcd`)."""
        return ",".join(f"https://{e}" for e in self.endpoints)

    def start(self) -> None:
        """Issue the certificates, start every member, wait until the cluster is healthy."""
        self.client_tls = self._issue(f"{self.prefix}-etcd-client", None)
        member_tls = self._member_certificate()
        for i, (client_port, peer_port) in enumerate(member_ports(self.address, self.size)):
            name = f"{self.prefix}-etcd{i}"
            self.members.append(EtcdMember(
                name, self.address, client_port, peer_port, self.work / name,
                member_tls, self.work / f"{name}.log"))
        for member in self.members:
            self.start_member(member)
        for member in self.members:
            self.wait_healthy(member)

    def start_member(self, member: EtcdMember) -> None:
        """Start (or restart, on its existing data dir) one member."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        log = open(member.log, "ab")  # noqa: SIM115 - owned by the process
        member.process = subprocess.Popen(
            member.argv(initial, f"{self.prefix}-{self.work.name}"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def kill_member(self, member: EtcdMember) -> None:
        """SIGKILL one member (a crash); its data dir stays for a restart."""
        if member.process and member.process.poll() is None:
            member.process.send_signal(signal.SIGKILL)
            member.process.wait()
        member.process = None

    def wait_healthy(self, member: EtcdMember, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the member answers /health with true (it then sees a leader)."""
        deadline = time.monotonic() + timeout
        context = client_context(self.client_tls)
        while time.monotonic() < deadline:
            if member.process is None or member.process.poll() is not None:
                raise RuntimeError(f"etcd member {member.name} exited: {self.log_tail(member)}")
            try:
                url = f"https://{member.endpoint}/health"
                with urllib.request.urlopen(url, timeout=1, context=context) as answer:
                    if b'"true"' in answer.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"etcd member {member.name} not healthy in {timeout:.0f} s: "
                           f"{self.log_tail(member)}")

    async def leader(self) -> EtcdMember:
        """The running member that is the leader now."""
        from godwit.cluster.store import Store

        for member in self.members:
            if member.process is None:
                continue
            async with Store(f"https://{member.endpoint}", self.client_tls) as one:
                status = await one.client.maintenance.status(timeout=2)
                if status.leader == status.header.member_id:
                    return member
        raise RuntimeError("no member of the etcd cluster is the leader")

    def log_tail(self, member: EtcdMember, size: int = 600) -> str:
        text = member.log.read_text(errors="replace") if member.log.exists() else ""
        return text[-size:].strip()

    def close(self) -> None:
        """Stop every member and remove the data dirs."""
        for member in self.members:
            if member.process and member.process.poll() is None:
                member.process.terminate()
                try:
                    member.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill_member(member)
            member.process = None
        shutil.rmtree(self.work, ignore_errors=True)

    def _member_certificate(self) -> TLSFiles:
        """One service certificate for every member of every lab cluster of this CA on this
        address (members share the address here, and the name etcd.godwit everywhere)."""
        name = f"lab-etcd-{self.address.replace('.', '-')}"
        try:
            return self.ca.bundle_for(name)
        except PKIError:
            return self._issue(name, [self.address])

    def _issue(self, name: str, addresses: list[str] | None) -> TLSFiles:
        """A certificate of the CA: a member's (role service: server and client auth, for its
        addresses and the name clients check; no agent accepts it) or, without addresses,
        a client's."""
        if addresses:
            self.ca.issue(name, "service", [*addresses, SERVER_NAME])
        else:
            self.ca.issue_client(name)
        return self.ca.bundle_for(name)


def member_ports(address: str, size: int) -> list[tuple[int, int]]:
    """(client, peer) ports of `size` members, all distinct: picked at once, since no
    member binds its ports before every member was given its own."""
    ports = _free_ports(address, 2 * size)
    return list(zip(ports[::2], ports[1::2], strict=True))


def _free_ports(address: str, count: int) -> list[int]:
    """`count` distinct ports free on `address` now, below the kernel's ephemeral range: a
    port from that range can go to a connection's local end (another member dialling its
    peers) before the member binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(PORTS_FROM, low), 64)
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((address, port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise RuntimeError(f"no {count} free ports on {address} below {low}")
    finally:
        for s in sockets:
            s.close()
