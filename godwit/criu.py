"""What the local CRIU can do: version, `criu check`, lazy pages, dirty-memory tracking."""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass

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
