"""Post-copy: restore on the destination first, then pull memory pages on demand.

The source dumps everything but memory (`runc checkpoint --lazy-pages`) and keeps serving
pages from its frozen copy over a CRIU page server (mutual TLS, bound to the address the
destination reaches it on). The destination restores at once; its `criu lazy-pages` daemon
fills pages on fault and in the background. The freeze therefore no longer grows with the
memory size.

The guarantee differs from stop-and-copy: until every page has arrived, the only complete
copy of the memory is the frozen source. If the transfer breaks, the destination copy is
incomplete and is killed (isolated first), and the source resumes from its frozen state:
exactly one copy runs, but what the destination computed since the restore is lost, and
TCP connections that exchanged data with it may be reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
from functools import cached_property

from godwit import procfs
from godwit.criu import CRIU, criu_has_option
from godwit.errors import GodwitError
from godwit.migration import AUTO_LAZY_MIN_BYTES
from godwit.migration.source import SourceMigration, protocol_at_least
from godwit.preflight import Need
from godwit.protocol import RestoreRequest
from godwit.qos import migration_ports
from godwit.runc import HeldRunc
from godwit.tls import TLSFiles

log = logging.getLogger("godwit.post_copy")
SLOWEST_PAGES_BPS = 20e6  # pages must all arrive before the fence: allow for this slow a link


class PostCopy(SourceMigration):
    strategy = "post-copy"
    stream_pages = False  # its pages go the other way, pulled by the destination
    fill_after_restore = False  # they come from the source, after the restore
    needs = (Need("destination", "lazy_pages", "lazy pages (userfaultfd)"),
             Need("source", "lazy_dump",
                  "`runc checkpoint --lazy-pages --page-server --status-fd`", runc=True),
             Need("destination", "lazy_restore", "`runc restore --lazy-pages`", runc=True))
    lazy_restore = True
    auto_rank = 1
    auto_min_memory = AUTO_LAZY_MIN_BYTES
    page_server: asyncio.subprocess.Process | None = None
    page_server_address = ""
    page_server_port: int | None = None

    @classmethod
    def auto_fits(cls, source: dict, dest: dict) -> bool:
        """Only between hosts that can both restore lazily (either may be the next
        destination)."""
        return bool(source.get("lazy_pages")) and super().auto_fits(source, dest)

    async def execute(self) -> None:
        try:
            await super().execute()
        finally:
            release_port(self.page_server_port)

    def prepare_dump(self) -> None:
        """The port of the dump's page server, told to the destination at arm."""
        destination = self.ctx.dest.address.rpartition(":")[0]
        address = local_address_towards(destination)
        self.page_server_port = free_port(address, migration_ports(self.ctx.agent_port))
        self.page_server_address = f"{address}:{self.page_server_port}"
        peer = destination if criu_knows_peer_name() else None
        self.ctx.store.write_criu_config(
            self.name, page_server_options(address, self.ctx.tls, peer))

    async def hold_dump(self) -> HeldRunc:
        return await self.runc.hold_lazy_checkpoint(self.name, self.dump_options(),
                                                    self.page_server_address)

    async def call_off_dump(self) -> None:
        """The held dump goes, and with it the page-server config `prepare_dump` wrote."""
        if self.held_dump or self.page_server_port is not None:
            await super().call_off_dump()
            self.ctx.store.write_criu_config(self.name)

    async def dump(self) -> None:
        with self.events.phase("dump"):
            self.page_server = await self.run_dump()
        pid = self.page_server.pid
        # A restarted agent must find the page server to stop it; after a host crash there
        # is none: no fsync in the freeze (the restore's journal entry makes it durable).
        self.save_journal(page_server_pid=pid, page_server_start=procfs.start_time(pid),
                          durable=False)

    @cached_property
    def fence_timeout(self) -> float:
        """The commit can only come once every page has arrived: give the transfer time.
        Computed once: the source's deadline must never be earlier than the destination's."""
        memory = self.ctx.store.memory_usage(self.name)
        return self.options.commit_timeout + memory / SLOWEST_PAGES_BPS

    def restore_request(self) -> RestoreRequest:
        return RestoreRequest(page_server=self.page_server_address)

    def lazy_page_server_at_arm(self) -> str | None:
        """Told at arm too, so that the destination's lazy-pages daemon starts then."""
        return self.page_server_address if protocol_at_least(self.dest_protocol, (2, 5)) \
            else None

    def images_in_memory(self) -> bool:
        """A lazy dump's images hold no pages, unless of shared memory (dumped with them)."""
        return protocol_at_least(self.dest_protocol, (2, 7)) and \
            not procfs.has_shared_memory(self.ctx.store.pids(self.name))

    async def verify(self) -> None:
        await self.wait_for_pages()
        await super().verify()

    async def wait_for_pages(self) -> None:
        """Every page pulled, and the source's page server that served them ended well."""
        await super().wait_for_pages()
        assert self.page_server
        if await self.page_server.wait() != 0:
            raise GodwitError("the source page server failed")

    async def release_source(self) -> None:
        """Rollback: freeze the ptrace-stopped tasks, then stop the page server, so the
        source stays paused until it is resumed on purpose."""
        pid = self.journal.extra.get("page_server_pid")
        if self.page_server:
            running = self.page_server.returncode is None
        else:  # after an agent restart: the same process, not a new one with a reused pid
            running = bool(pid) and procfs.start_time(pid) == self.journal.extra.get(
                "page_server_start")
        if pid and running:
            with contextlib.suppress(GodwitError):
                await self.runc.pause(self.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            if self.page_server:
                await self.page_server.wait()
        self.ctx.store.write_criu_config(self.name)

    async def cleanup_source(self) -> None:
        self.ctx.store.write_criu_config(self.name)  # no page server on a later dump
        await super().cleanup_source()


def page_server_options(address: str, tls: TLSFiles | None, peer: str | None) -> list[str]:
    """CRIU options of the lazy dump's page server: its bind address and TLS identity;
    only a client whose certificate names ``peer`` (the destination's address, as this
    agent dialled it) is served (CRIU's `tls-peer-name`, scripts/criu-patches/0012). A
    CRIU without that patch (``peer`` None) serves any certificate of the CA. The client
    checks the source's name itself."""
    lines = [f"address {address}"]
    if tls:
        lines += ["tls", f"tls-cacert {tls.ca}", f"tls-cert {tls.cert}", f"tls-key {tls.key}",
                  f"tls-peer-name {peer}" if peer else "tls-no-cn-verify"]
        if tls.crl:
            lines.append(f"tls-cacrl {tls.crl}")
    return lines


@functools.cache
def criu_knows_peer_name() -> bool:
    """Does this CRIU take `tls-peer-name` (scripts/criu-patches/0012)? Asked once; without
    it the page server serves any certificate of the CA, and the agent says so."""
    if criu_has_option("--tls-peer-name"):
        return True
    log.warning("%s lacks --tls-peer-name (godwit's CRIU patch 0012, run scripts/setup): "
                "post-copy page servers serve any certificate of the CA", CRIU)
    return False


def local_address_towards(host: str) -> str:
    """This host's address on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


# Page-server ports handed to migrations of this agent: CRIU binds one only after the
# freeze, so a port that is merely free now could go to two migrations armed together.
_reserved_ports: set[int] = set()


def free_port(address: str, ports: range) -> int:
    """Reserve a free port of the migration block (which QoS classifies as migration
    traffic); `release_port` gives it back."""
    for port in ports:
        if port in _reserved_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
        _reserved_ports.add(port)
        return port
    raise GodwitError(f"no free page-server port in {ports.start}-{ports.stop - 1}")


def release_port(port: int | None) -> None:
    _reserved_ports.discard(port)
