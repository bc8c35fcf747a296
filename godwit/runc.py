"""Async driver for the runc binary; one instance per runc state root."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from godwit.errors import GodwitError, NotFound

RUNC = os.environ.get("GODWIT_RUNC", "runc")


class RuncError(GodwitError):
    """runc exited with an error."""


@dataclass(frozen=True)
class ContainerState:
    """What `runc state` reports about one container."""

    name: str
    status: str
    pid: int
    bundle: str
    created: str


@dataclass(frozen=True)
class CheckpointOptions:
    """Options of a CRIU dump through `runc checkpoint`."""

    image_path: Path
    work_path: Path
    leave_running: bool = False
    tcp_established: bool = False
    parent_path: Path | str | None = None
    pre_dump: bool = False
    lazy_pages: bool = False
    page_server: str | None = None


async def _run(argv: list[str]) -> str:
    """Run a command with stdin detached; return stdout or raise RuncError."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuncError(_last_error_line(err.decode(errors="replace")) or f"{_verb(argv)} failed")
    return out.decode(errors="replace")


async def _run_detached(argv: list[str]) -> None:
    """Run `runc run/restore --detach`: the container inherits runc's stdio, so it all goes
    to /dev/null (a pipe would never close, and CRIU cannot dump it); errors come from
    runc's JSON log file."""
    with tempfile.NamedTemporaryFile(prefix="godwit-runc-", suffix=".log") as log:
        full = [argv[0], "--log", log.name, "--log-format", "json", *argv[1:]]
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()
        if proc.returncode != 0:
            message = _last_error_line(Path(log.name).read_text(errors="replace"))
            raise RuncError(message or f"{_verb(argv)} failed")


def _verb(argv: list[str]) -> str:
    """'runc restore' out of a full runc command line."""
    words = [a for a in argv[1:] if not a.startswith("-")]
    return f"runc {words[1] if len(words) > 1 else words[0] if words else ''}".strip()


def _last_error_line(stderr: str) -> str:
    """runc prints JSON log lines or plain text; keep the most telling line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            return line
        if isinstance(record, dict) and record.get("level") == "error":
            return str(record.get("msg", line))
    return lines[-1] if lines else ""


class Runc:
    """runc commands against one `--root` (one host's container state)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _argv(self, *args: str) -> list[str]:
        return [RUNC, "--root", str(self.root), *args]

    async def run_detached(self, name: str, bundle: Path) -> None:
        """Create and start a container whose stdio is /dev/null."""
        await _run_detached(self._argv("run", "--detach", "--bundle", str(bundle), name))

    async def state(self, name: str) -> ContainerState:
        """State of one container; NotFound when runc does not know it."""
        try:
            raw = json.loads(await _run(self._argv("state", name)))
        except RuncError as exc:
            if "does not exist" in str(exc) or "not exist" in str(exc):
                raise NotFound(f"container {name} not found") from exc
            raise
        return _state_from_json(raw)

    async def list(self) -> list[ContainerState]:
        """All containers under this root."""
        if not self.root.exists():
            return []
        out = await _run(self._argv("list", "--format", "json"))
        return [_state_from_json(item) for item in json.loads(out or "null") or []]

    async def pause(self, name: str) -> None:
        await _run(self._argv("pause", name))

    async def resume(self, name: str) -> None:
        await _run(self._argv("resume", name))

    async def kill(self, name: str, signal: str = "KILL") -> None:
        await _run(self._argv("kill", name, signal))

    async def delete(self, name: str) -> None:
        """Kill (if needed) and delete a container; a missing one is fine."""
        try:
            await _run(self._argv("delete", "--force", name))
        except RuncError as exc:
            if "does not exist" not in str(exc):
                raise

    async def exec(self, name: str, argv: list[str]) -> tuple[int, str, str]:
        """Run a command inside a container; returns (exit code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *self._argv("exec", name, *argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def checkpoint(self, name: str, opts: CheckpointOptions) -> None:
        """Dump a container with CRIU."""
        args = ["checkpoint", "--image-path", str(opts.image_path)]
        args += ["--work-path", str(opts.work_path)]
        if opts.leave_running:
            args.append("--leave-running")
        if opts.tcp_established:
            args.append("--tcp-established")
        if opts.pre_dump:
            args.append("--pre-dump")
        if opts.parent_path:
            args += ["--parent-path", str(opts.parent_path)]
        if opts.lazy_pages:
            args.append("--lazy-pages")
        if opts.page_server:
            args += ["--page-server", opts.page_server]
        await _run(self._argv(*args, name))

    async def start_lazy_checkpoint(self, name: str, opts: CheckpointOptions,
                                    page_server: str) -> asyncio.subprocess.Process:
        """Dump with lazy pages; return once the small images are written and the page
        server listens (runc's status fd). The process serves pages until the destination
        has them all; it runs in its own session so that a rollback can kill runc and CRIU."""
        read_end, write_end = os.pipe()  # a write-only status fd, as runc requires
        args = ["checkpoint", "--lazy-pages", "--page-server", page_server,
                "--status-fd", str(write_end), "--leave-running",
                "--image-path", str(opts.image_path), "--work-path", str(opts.work_path)]
        if opts.tcp_established:
            args.append("--tcp-established")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(*args, name), pass_fds=(write_end,), start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        finally:
            os.close(write_end)
        try:
            ready = await asyncio.to_thread(os.read, read_end, 1)
        finally:
            os.close(read_end)
        if ready != b"\0":
            err = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
            await proc.wait()
            raise RuncError(_last_error_line(err) or "lazy checkpoint failed")
        return proc

    async def restore(
        self, name: str, bundle: Path, image_path: Path, work_path: Path, *,
        tcp_established: bool = False, lazy_pages: bool = False,
    ) -> int:
        """Restore a container from CRIU images, detached, stdio /dev/null; returns the
        pid of its init process."""
        pid_file = work_path / "restored.pid"
        args = ["restore", "--detach", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        args += ["--image-path", str(image_path), "--work-path", str(work_path)]
        if tcp_established:
            args.append("--tcp-established")
        if lazy_pages:
            args.append("--lazy-pages")
        await _run_detached(self._argv(*args, name))
        return int(pid_file.read_text())

    async def version(self) -> str:
        out = await _run([RUNC, "--version"])
        return out.splitlines()[0].removeprefix("runc version ").strip() if out else "unknown"


def _state_from_json(raw: dict) -> ContainerState:
    return ContainerState(
        name=raw["id"],
        status=raw.get("status", "unknown"),
        pid=int(raw.get("pid") or 0),
        bundle=raw.get("bundle", ""),
        created=raw.get("created", ""),
    )
