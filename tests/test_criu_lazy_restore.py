"""A lazy restore from local images, as godwit's stop-and-copy restores once every page is
on the destination: `criu restore --lazy-pages` returns before the memory is copied and
`criu lazy-pages` (no page server) fills it from the pages image, in the background too.
With the CRIU godwit runs (GODWIT_CRIU or the installed one)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from memhog_process import Memhog, memhog_fixture, verified_state

from godwit.criu import CRIU, lazy_pages_verdict, start_lazy_pages

pytestmark = pytest.mark.integration
FILL_TIMEOUT_S = 60


@pytest.fixture
def memhog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Memhog]:
    yield from memhog_fixture(request, tmp_path)


async def lazy_restore(images: Path, work: Path, pidfile: Path,
                       staged: Path | None = None) -> int:
    """Restore lazily from `images`; the lazy-pages daemon's exit code once it is done.
    With `staged`, the daemon starts on an empty `images` (`--start-before-images`,
    scripts/criu-patches/0022) and the dump's files are moved there once it listens."""
    daemon = await start_lazy_pages(images, work, None, None, before_images=bool(staged))
    try:
        for image in staged.iterdir() if staged else ():
            image.rename(images / image.name)
        restore = await asyncio.create_subprocess_exec(
            CRIU, "restore", "-D", str(images), "-W", str(work), "-d", "--lazy-pages",
            "--pidfile", str(pidfile), "-v4", "-o", "restore.log",
            stdin=subprocess.DEVNULL)
        assert await restore.wait() == 0, f"criu restore failed, see {work / 'restore.log'}"
        try:
            return await asyncio.wait_for(daemon.wait(), FILL_TIMEOUT_S)
        except TimeoutError:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
            pytest.fail(f"criu lazy-pages did not fill the memory within {FILL_TIMEOUT_S} s "
                        "(scripts/criu-patches/0005: it waited for a page server's answer)")
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()


def dump(memhog: Memhog, images: Path) -> None:
    """Dump the memhog (killed) into `images`, its pid free for the restore."""
    images.mkdir()
    subprocess.run([CRIU, "dump", "-t", str(memhog.proc.pid), "-D", str(images), "-v4",
                    "-o", "dump.log"], stdin=subprocess.DEVNULL, check=True, timeout=120)
    memhog.proc.wait(10)


def check_restored(memhog: Memhog, work: Path, pidfile: Path) -> None:
    complete, detail = lazy_pages_verdict(work)
    assert complete, detail
    state = verified_state(memhog, int(pidfile.read_text()))
    assert " ok=1 " in state, f"restored memhog's memory differs: {state}"


@pytest.mark.parametrize("memhog", [64], indirect=True)
def test_lazy_restore_from_local_images_fills_all_memory(tmp_path: Path,
                                                          memhog: Memhog) -> None:
    images, work, pidfile = tmp_path / "images", tmp_path / "work", tmp_path / "restored.pid"
    dump(memhog, images)
    work.mkdir()
    assert asyncio.run(lazy_restore(images, work, pidfile)) == 0
    check_restored(memhog, work, pidfile)


@pytest.mark.parametrize("memhog", [64], indirect=True)
def test_a_daemon_started_before_the_images_serves_the_restore(tmp_path: Path,
                                                               memhog: Memhog) -> None:
    """godwit starts it at arm, before the dump: the images come after it listens."""
    dumped, images = tmp_path / "dumped", tmp_path / "images"
    work, pidfile = tmp_path / "work", tmp_path / "restored.pid"
    dump(memhog, dumped)
    images.mkdir()
    work.mkdir()
    assert asyncio.run(lazy_restore(images, work, pidfile, staged=dumped)) == 0
    check_restored(memhog, work, pidfile)
