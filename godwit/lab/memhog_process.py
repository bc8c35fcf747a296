"""memhog run as a plain process (no container), for the tests and benches of CRIU alone:
it touches N MiB and, on SIGUSR1, recomputes the checksum of all of it (" ok=1 " in its
state when it still matches)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from godwit import procfs
from godwit.lab.workloads import build_memhog

Launch = Callable[..., subprocess.Popen]  # subprocess.Popen's signature
# memhog alone in a pid namespace: a restore, while a lazy dump still holds the stopped
# original, gets a namespace of its own and its pid back.
IN_PID_NAMESPACE = ["unshare", "--pid", "--fork", "setsid"]


class MemhogError(RuntimeError):
    """memhog did not start, or its memory did not verify."""


@dataclass
class Memhog:
    proc: subprocess.Popen
    state: Path

    def read(self) -> str:
        return self.state.read_text() if self.state.exists() else ""

    def pid_in_namespace(self) -> int:
        """memhog's pid when started under IN_PID_NAMESPACE (unshare forked it)."""
        if not (children := procfs.children(self.proc.pid)):
            raise MemhogError("memhog is not running under unshare")
        return children[0]

    def stop(self) -> None:
        """memhog goes, and so does one left alone in its pid namespace: killing unshare
        does not kill its child."""
        for child in procfs.children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def in_pid_namespace(argv: list[str], **popen: object) -> subprocess.Popen:
    """A `launch` that starts memhog alone in a new pid namespace."""
    return subprocess.Popen([*IN_PID_NAMESPACE, *argv], **popen)


def start_memhog(directory: Path, mib: int, launch: Launch = subprocess.Popen,
                 timeout: float = 60) -> Memhog:
    """memhog touching `mib` MiB of random, never dirtied memory, started by `launch`;
    returned once it is ready."""
    state = directory / f"memhog-{mib}.state"
    state.unlink(missing_ok=True)
    proc = launch([str(build_memhog()), str(mib), "5", str(state), "0"],
                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL, start_new_session=True)
    hog = Memhog(proc, state)
    deadline = time.monotonic() + timeout
    while not hog.read().startswith("ready"):
        if proc.poll() is not None or time.monotonic() > deadline:
            hog.stop()
            raise MemhogError(f"memhog of {mib} MiB did not become ready")
        time.sleep(0.05)
    return hog


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
