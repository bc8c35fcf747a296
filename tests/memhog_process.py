"""memhog run as a plain process (no container), for tests of CRIU alone: it touches N MiB,
and on SIGUSR1 recomputes the checksum of all of it (" ok=1 " when it still matches)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from godwit.lab.workloads import build_memhog


@dataclass
class Memhog:
    proc: subprocess.Popen
    state: Path

    def read(self) -> str:
        return self.state.read_text() if self.state.exists() else ""


def start_memhog(directory: Path, mib: int,
                 launch: Callable[..., subprocess.Popen] = subprocess.Popen) -> Memhog:
    """memhog touching `mib` MiB, started by `launch` (Popen's signature), once ready."""
    state = directory / "memhog.state"
    proc = launch([str(build_memhog()), str(mib), "5", str(state), "0"],
                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL, start_new_session=True)
    hog = Memhog(proc, state)
    deadline = time.monotonic() + 60
    while not hog.read().startswith("ready"):
        assert proc.poll() is None and time.monotonic() < deadline, "memhog did not start"
        time.sleep(0.05)
    return hog


def memhog_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Memhog]:
    """Body of an indirect `memhog` fixture: request.param is the MiB to touch."""
    hog = start_memhog(tmp_path, request.param)
    yield hog
    if hog.proc.poll() is None:
        hog.proc.kill()
        hog.proc.wait()


def verified_state(hog: Memhog, pid: int, timeout: float = 60) -> str:
    """Have the (restored) memhog `pid` check all its memory; its state line, then kill it."""
    try:
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not hog.read().startswith("verified") and time.monotonic() < deadline:
            time.sleep(0.05)
        return hog.read()
    finally:
        os.kill(pid, signal.SIGKILL)
