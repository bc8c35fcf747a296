"""What the local CRIU can do: version, `criu check`, lazy pages, dirty-memory tracking."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from godwit.errors import GodwitError
from godwit.tls import TLSFiles

CRIU = os.environ.get("GODWIT_CRIU", "criu")


@dataclass(frozen=True)
class CriuCapabilities:
    """CRIU facts of one host, as used for strategy selection and pre-flight checks."""

    version: str
    check_ok: bool
    check_message: str
    lazy_pages: bool
    soft_dirty: bool

    def to_json(self) -> dict:
        return asdict(self)


async def run_criu(*args: str) -> tuple[int, str]:
    """Run criu; return (exit code, combined output). A missing binary is exit code 127."""
    try:
        proc = await asyncio.create_subprocess_exec(
            CRIU, *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError:
        return 127, f"{CRIU} not found"
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def _version() -> str:
    rc, out = await run_criu("--version")
    if rc != 0:
        return "missing"
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("Version:").split("Warn")[0].strip() or "unknown"


async def _feature(name: str) -> bool:
    rc, _ = await run_criu("check", "--feature", name)
    return rc == 0


async def probe() -> CriuCapabilities:
    """Ask the local CRIU what it supports."""
    version = await _version()
    rc, out = await run_criu("check")
    lazy, dirty = await asyncio.gather(_feature("uffd-noncoop"), _feature("mem_dirty_track"))
    message = out.splitlines()[-1] if out else ""
    return CriuCapabilities(version, rc == 0, message, lazy, dirty)


LAZY_LOG = "lazy-pages.log"
_TRANSFERRED = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")


async def start_lazy_pages(images: Path, work: Path, page_server: str,
                           tls: TLSFiles | None) -> asyncio.subprocess.Process:
    """Destination side of post-copy: the daemon that fetches pages from the source's page
    server into the restored process (userfaultfd). `runc restore --lazy-pages` must use
    the same work dir, where the daemon's socket appears once it is ready."""
    address, _, port = page_server.rpartition(":")
    argv = [CRIU, "lazy-pages", "--page-server", "--address", address, "--port", port,
            "-D", str(images), "-W", str(work), "-v4", "-o", LAZY_LOG]
    if tls:
        argv += ["--tls", "--tls-cacert", str(tls.ca), "--tls-cert", str(tls.cert),
                 "--tls-key", str(tls.key)]
        if tls.crl:
            argv += ["--tls-cacrl", str(tls.crl)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    socket_path = work / "lazy-pages.socket"
    for _ in range(500):
        if socket_path.exists() or proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    if not socket_path.exists():
        proc.kill()
        raise GodwitError(f"criu lazy-pages did not start: {lazy_pages_verdict(work)[1]}")
    return proc


def lazy_pages_verdict(work: Path) -> tuple[bool, str]:
    """Did the lazy-pages daemon deliver every page? Its exit code alone does not tell:
    it also exits 0 when the restored process died part-way."""
    try:
        log = (work / LAZY_LOG).read_text(errors="replace")
    except FileNotFoundError:
        return False, "no lazy-pages log"
    counts = [(int(a), int(b)) for a, b in _TRANSFERRED.findall(log)]
    if not counts:
        errors = [line for line in log.splitlines() if "Error" in line]
        return False, errors[-1].strip() if errors else "no page was transferred"
    if ": EXIT" in log or any(done != total for done, total in counts):
        return False, f"pages missing: {sum(d for d, _ in counts)}/{sum(t for _, t in counts)}"
    return True, f"{sum(d for d, _ in counts)} pages transferred"


def log_error(work: Path, log_name: str) -> str | None:
    """The last error CRIU wrote to a log in its work dir: runc only says "criu failed"."""
    try:
        lines = (work / log_name).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    errors = [line.split("Error (", 1)[1] for line in lines if "Error (" in line]
    causes = [e.split("): ", 1)[-1].strip() for e in errors if "FAILED" not in e]
    return causes[0] if causes else None
