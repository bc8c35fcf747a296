"""What a host's runc can do for a migration, probed once at agent start.

`runc --version` gives the version; `runc features` (experimental in 1.1, stable since 1.2)
says whether runc was built with checkpoint support; the help of `runc checkpoint` and
`runc restore` names the options the strategies use (lazy pages, page server, pre-dump).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass

CHECKPOINT_ANNOTATION = "org.opencontainers.runc.checkpoint.enabled"
LAZY_DUMP_OPTIONS = ("--lazy-pages", "--page-server", "--status-fd")
PRE_DUMP_OPTIONS = ("--pre-dump", "--parent-path")


@dataclass(frozen=True)
class RuncFeatures:
    """One runc binary's version and checkpoint abilities."""

    binary: str
    version: str  # "1.1.5+ds1", or "missing"
    checkpoint: bool  # built with checkpoint/restore
    lazy_dump: bool  # `runc checkpoint --lazy-pages --page-server --status-fd`
    lazy_restore: bool  # `runc restore --lazy-pages`
    pre_dump: bool  # `runc checkpoint --pre-dump --parent-path`

    def to_json(self) -> dict:
        return asdict(self)


async def probe_runc(binary: str) -> RuncFeatures:
    """Ask `binary` what it is and what it supports; a missing runc supports nothing."""
    code, out = await _output(binary, "--version")
    if code != 0:
        return RuncFeatures(binary, "missing", False, False, False, False)
    version = out.splitlines()[0].removeprefix("runc version ").strip() if out else "unknown"
    dump_help = (await _output(binary, "checkpoint", "--help"))[1]
    restore_help = (await _output(binary, "restore", "--help"))[1]
    return RuncFeatures(
        binary=binary,
        version=version,
        checkpoint=bool(dump_help) and await _checkpoint_enabled(binary),
        lazy_dump=all(option in dump_help for option in LAZY_DUMP_OPTIONS),
        lazy_restore="--lazy-pages" in restore_help,
        pre_dump=all(option in dump_help for option in PRE_DUMP_OPTIONS),
    )


async def _checkpoint_enabled(binary: str) -> bool:
    """`runc features` says so; a runc without that command is taken at its help text."""
    code, out = await _output(binary, "features")
    try:
        annotations = json.loads(out).get("annotations") or {} if code == 0 else {}
    except (ValueError, AttributeError):
        annotations = {}
    return annotations.get(CHECKPOINT_ANNOTATION, "true") != "false"


async def _output(binary: str, *args: str) -> tuple[int, str]:
    """Exit code and stdout of a runc command; 127 when it cannot be run."""
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return 127, ""
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def series(version: str | None) -> tuple[int, int] | None:
    """(1, 3) of '1.3.6+ds1': runc's feature releases are its minor versions."""
    parts = (version or "").split("+")[0].split("-")[0].split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])
