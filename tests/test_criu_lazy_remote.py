"""A lazy restore fed by a page server, as godwit's post-copy runs it: `criu dump
--lazy-pages` serves the memory it left in the stopped task, `criu lazy-pages --page-server`
fetches it on fault and in the background, and every byte arrives. With the CRIU godwit
runs (GODWIT_CRIU or the installed one)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import TLS_RECORD, free_port, system_calls
from memhog_process import Memhog, start_memhog, verified_state

import godwit.criu
from godwit.criu import CRIU, LAZY_LOG, lazy_pages_verdict, start_lazy_pages, tls_argv
from godwit.lab.memhog_process import in_pid_namespace
from godwit.tls import TLSFiles

pytestmark = pytest.mark.integration
ADDRESS = "127.0.0.1"
FILL_TIMEOUT_S = 60
READ = re.compile(r"Read ([0-9a-f]+) (\d+) pages")
COPIED = re.compile(r"uffd_copy: 0x([0-9a-f]+)/")
MEMHOG_MIB = 64


@pytest.fixture
def memhog(tmp_path: Path) -> Iterator[Memhog]:
    """A 64 MiB memhog alone in a pid namespace: its restore, while the lazy dump still
    holds the stopped original, gets a namespace of its own and its pid back."""
    hog = start_memhog(tmp_path, MEMHOG_MIB, in_pid_namespace)
    yield hog
    hog.stop()


async def lazy_dump(pid: int, images: Path, port: int, tls: TLSFiles | None,
                    under: Sequence[str]) -> asyncio.subprocess.Process:
    """`criu dump --lazy-pages` of `pid` (run under `under`, a command prefix such as
    strace), returned once its page server listens."""
    read_end, write_end = os.pipe()
    dump = await asyncio.create_subprocess_exec(
        *under, CRIU, "dump", "-t", str(pid), "-D", str(images), "--lazy-pages", "--address",
        ADDRESS, "--port", str(port), "--status-fd", str(write_end), "-v4", "-o", "dump.log",
        *tls_argv(tls, check_peer_name=False), stdin=subprocess.DEVNULL, pass_fds=(write_end,))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as status:
        ready = await asyncio.to_thread(status.read, 1)
    assert ready == b"\0", f"criu dump did not serve its pages, see {images / 'dump.log'}"
    return dump


async def post_copy(hog: Memhog, tmp_path: Path,
                    tls: tuple[TLSFiles, TLSFiles] | None = None,
                    dump_under: Sequence[str] = ()) -> tuple[int, Path]:
    """Dump lazily, restore lazily from the dump's page server (over TLS with the server's
    and the client's files); the restored pid and the daemon's work dir once every page
    is in."""
    images, work, pidfile = tmp_path / "images", tmp_path / "work", tmp_path / "restored.pid"
    images.mkdir()
    work.mkdir()
    port = free_port(ADDRESS)
    dump = await lazy_dump(hog.pid_in_namespace(), images, port, tls[0] if tls else None,
                           dump_under)
    daemon = await start_lazy_pages(images, work, f"{ADDRESS}:{port}", tls[1] if tls else None)
    try:
        restore = await asyncio.create_subprocess_exec(
            CRIU, "restore", "-D", str(images), "-W", str(work), "-d", "--lazy-pages",
            "--pidfile", str(pidfile), "-v4", "-o", "restore.log", stdin=subprocess.DEVNULL)
        assert await restore.wait() == 0, f"criu restore failed, see {work / 'restore.log'}"
        assert await asyncio.wait_for(daemon.wait(), FILL_TIMEOUT_S) == 0, \
            f"criu lazy-pages failed, see {work / LAZY_LOG}"
        assert await asyncio.wait_for(dump.wait(), FILL_TIMEOUT_S) == 0, \
            f"criu dump failed, see {images / 'dump.log'}"
    finally:
        for proc in (daemon, dump):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return int(pidfile.read_text()), work


@contextlib.contextmanager
def filled(hog: Memhog, tmp_path: Path, tls: tuple[TLSFiles, TLSFiles] | None = None,
           dump_under: Sequence[str] = ()) -> Iterator[Path]:
    """A post-copy (see post_copy) whose daemon got every page: yields the daemon's work
    dir; afterwards the restored memhog must find all its memory intact."""
    pid, work = asyncio.run(post_copy(hog, tmp_path, tls, dump_under))
    try:
        complete, detail = lazy_pages_verdict(work)
        assert complete, detail
        yield work
    finally:
        state = verified_state(hog, pid)
    assert " ok=1 " in state, f"restored memhog's memory differs: {state}"


def most_background_requests_in_flight(lazy_log: Path) -> int:
    """The most ranges of several pages (the background's; a fault asks for one page)
    requested and not yet copied in, at any point of the daemon's log."""
    pending: set[int] = set()
    most = 0
    for line in lazy_log.read_text().splitlines():
        if (read := READ.search(line)) and int(read[2]) > 1:
            pending.add(int(read[1], 16))
            most = max(most, len(pending))
        elif copied := COPIED.search(line):
            pending.discard(int(copied[1], 16))
    return most


def test_background_fetch_keeps_two_requests_in_flight(tmp_path: Path,
                                                       memhog: Memhog) -> None:
    """The daemon asked for the next range only once the previous one was copied in: the
    page server and the daemon waited for each other in turn (scripts/criu-patches/0020)."""
    with filled(memhog, tmp_path) as work:
        assert most_background_requests_in_flight(work / LAZY_LOG) == 2


def test_tls_page_server_answers_in_batches(tmp_path: Path, memhog: Memhog,
                                            identities: tuple[TLSFiles, TLSFiles]) -> None:
    """gnutls hands each record to a send() of its own: the lazy dump's page server sent
    a TCP segment per 16 KiB of an answer, each a trip through both ends' network stack
    (scripts/criu-patches/0021)."""
    summary = tmp_path / "strace.txt"
    strace = ["strace", "-f", "-c", "-e", "trace=sendto", "-o", str(summary)]
    with filled(memhog, tmp_path, identities, dump_under=strace):
        records = (MEMHOG_MIB << 20) / TLS_RECORD
        calls = system_calls(summary, "sendto")
        assert 0 < calls < records / 8, f"{calls} sends for {records:.0f} records of pages"


def daemon_under_strace(tmp_path: Path, calls: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Have godwit start the lazy-pages daemon under `strace -c -e trace=calls`; returns
    where the summary will be."""
    summary = tmp_path / "daemon-strace.txt"
    wrapper = tmp_path / "criu-under-strace"
    wrapper.write_text(f"#!/bin/sh\nexec strace -f -c -e trace={calls} -o {summary} "
                       f"{shutil.which(CRIU) or CRIU} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(godwit.criu, "CRIU", str(wrapper))
    return summary


def test_tls_answers_read_without_an_epoll_wait_per_record(
        tmp_path: Path, memhog: Memhog, identities: tuple[TLSFiles, TLSFiles],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon read one TLS record of an answer per epoll event, then went back to
    epoll_wait(): a system call per 16 KiB of pages (scripts/criu-patches/0024)."""
    summary = daemon_under_strace(tmp_path, "epoll_wait", monkeypatch)
    with filled(memhog, tmp_path, identities):
        records = (MEMHOG_MIB << 20) / TLS_RECORD
        calls = system_calls(summary, "epoll_wait")
        assert 0 < calls < records / 4, f"{calls} epoll waits for {records:.0f} records"


def test_tls_answers_read_many_records_per_recv(
        tmp_path: Path, memhog: Memhog, identities: tuple[TLSFiles, TLSFiles],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gnutls reads a record's header and its body with a recv() each: the daemon made two
    system calls per 16 KiB of pages (scripts/criu-patches/0024)."""
    summary = daemon_under_strace(tmp_path, "recvfrom", monkeypatch)
    with filled(memhog, tmp_path, identities):
        records = (MEMHOG_MIB << 20) / TLS_RECORD
        calls = system_calls(summary, "recvfrom")
        assert 0 < calls < records / 4, f"{calls} recv calls for {records:.0f} records"
