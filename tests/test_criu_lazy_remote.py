"""A lazy restore fed by a page server, as godwit's post-copy runs it: `criu dump
--lazy-pages` serves the memory it left in the stopped task, `criu lazy-pages --page-server`
fetches it on fault and in the background, and every byte arrives. With the CRIU godwit
runs (GODWIT_CRIU or the installed one)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from memhog_process import Memhog, start_memhog, verified_state

from godwit.criu import CRIU, LAZY_LOG, lazy_pages_verdict, start_lazy_pages

pytestmark = pytest.mark.integration
ADDRESS = "127.0.0.1"
FILL_TIMEOUT_S = 60
READ = re.compile(r"Read ([0-9a-f]+) (\d+) pages")
COPIED = re.compile(r"uffd_copy: 0x([0-9a-f]+)/")


@pytest.fixture
def memhog(tmp_path: Path) -> Iterator[Memhog]:
    """A 64 MiB memhog alone in a pid namespace: its restore, while the lazy dump still
    holds the stopped original, gets a namespace of its own and its pid back."""
    hog = start_memhog(tmp_path, 64, lambda argv, **kw: subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", *argv], **kw))
    yield hog
    hog.proc.kill()
    hog.proc.wait()


def in_namespace(hog: Memhog) -> int:
    """memhog's pid (unshare forked it)."""
    return int(Path(f"/proc/{hog.proc.pid}/task/{hog.proc.pid}/children").read_text())


async def lazy_dump(pid: int, images: Path, port: int) -> asyncio.subprocess.Process:
    """`criu dump --lazy-pages` of `pid`, returned once its page server listens."""
    read_end, write_end = os.pipe()
    dump = await asyncio.create_subprocess_exec(
        CRIU, "dump", "-t", str(pid), "-D", str(images), "--lazy-pages", "--address",
        ADDRESS, "--port", str(port), "--status-fd", str(write_end), "-v4", "-o", "dump.log",
        stdin=subprocess.DEVNULL, pass_fds=(write_end,))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as status:
        ready = await asyncio.to_thread(status.read, 1)
    assert ready == b"\0", f"criu dump did not serve its pages, see {images / 'dump.log'}"
    return dump


async def post_copy(hog: Memhog, tmp_path: Path) -> tuple[int, Path]:
    """Dump lazily, restore lazily from the dump's page server; the restored pid and the
    daemon's work dir once every page is in."""
    images, work, pidfile = tmp_path / "images", tmp_path / "work", tmp_path / "restored.pid"
    images.mkdir()
    work.mkdir()
    port = free_port(ADDRESS)
    dump = await lazy_dump(in_namespace(hog), images, port)
    daemon = await start_lazy_pages(images, work, f"{ADDRESS}:{port}", None)
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
    pid, work = asyncio.run(post_copy(memhog, tmp_path))
    try:
        complete, detail = lazy_pages_verdict(work)
        assert complete, detail
        assert most_background_requests_in_flight(work / LAZY_LOG) == 2
    finally:
        state = verified_state(memhog, pid)
    assert " ok=1 " in state, f"restored memhog's memory differs: {state}"
