"""Async driver for the runc binary; one instance per runc state root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from godwit import criu_gate, procfs, tmpfs
from godwit.criu import CRIU, read_status_byte, wait_readable
from godwit.errors import GodwitError, NotFound
from godwit.fsio import atomic_write

DEFAULT_RUNC = "runc"  # Debian's, on PATH; agents choose another with `--runc`
CURRENT_RUNC = Path("/usr/local/lib/godwit/runc-1.3/runc")  # scripts/runc-current
HOLD_TIMEOUT_S = 30.0  # runc's start-up until its CRIU request waits at the gate
CALL_OFF_TIMEOUT_S = 10.0
INIT_EXIT_WAIT_S = 5.0  # a SIGKILLed init not gone by then: `runc delete --force` decides
RESTORED_PID = "restored.pid"  # runc restore --pid-file, in the work dir
RUNC_LOG = "runc.log"  # runc's own log of a checkpoint or restore, in CRIU's work dir
T = TypeVar("T")


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


async def _spawn(argv: list[str], gate: CriuGate | None = None,
                 **kwargs) -> asyncio.subprocess.Process:
    """Start a runc command, stdin detached; with a gate, its CRIU runs through the shim
    (runc runs the `criu` its PATH finds: runc 1.2 and later ignore `--criu`)."""
    env = {**os.environ, **gate.environment()} if gate else None
    return await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, env=env, **kwargs)


async def _run(argv: list[str]) -> str:
    """Run a command with stdin detached; return stdout or raise RuncError."""
    proc = await _spawn(argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return await _output(proc, argv)


async def _output(proc: asyncio.subprocess.Process, argv: list[str]) -> str:
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuncError(_last_error_line(err.decode(errors="replace")) or f"{_verb(argv)} failed")
    return out.decode(errors="replace")


async def _run_detached(argv: list[str], log: Path | None, log_dir: Path) -> None:
    """Run `runc run/restore --detach` to its end (see `_spawn_detached`)."""
    path, proc = await _spawn_detached(argv, log, log_dir)
    await _detached_outcome(path, proc, argv, keep_log=log is not None)


async def _spawn_detached(argv: list[str], log: Path | None, log_dir: Path,
                          gate: CriuGate | None = None,
                          ) -> tuple[Path, asyncio.subprocess.Process]:
    """Start `runc run/restore --detach`: the container inherits runc's stdio, so it all
    goes to /dev/null (a pipe would never close, and CRIU cannot dump it); errors go to
    runc's JSON log file, `log` or else a temporary one in `log_dir`, returned with the
    process."""
    temporary = log is None
    if log is None:
        log_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="runc-", suffix=".log", dir=log_dir)
        os.close(fd)
        log = Path(name)
    devnull = asyncio.subprocess.DEVNULL
    try:
        return log, await _spawn(_logged(argv, log), gate, stdout=devnull, stderr=devnull)
    except BaseException:
        if temporary:
            log.unlink()
        raise


def _logged(argv: list[str], log: Path) -> list[str]:
    """A runc command line that also writes runc's log (JSON) to `log`, appending."""
    return [argv[0], "--log", str(log), "--log-format", "json", *argv[1:]]


async def _detached_outcome(log: Path, proc: asyncio.subprocess.Process,
                            argv: list[str], keep_log: bool) -> None:
    """Wait for a detached runc; a temporary log goes, a kept one stays for diagnosis."""
    try:
        await proc.wait()
        if proc.returncode != 0:
            message = _last_error_line(log.read_text(errors="replace"))
            raise RuncError(message or f"{_verb(argv)} failed")
    finally:
        if not keep_log:
            log.unlink(missing_ok=True)


def install_gate(directory: Path) -> Path:
    """Install `godwit.criu_gate` as `directory/criu-gate/criu`, an executable script run
    by this Python in isolated mode (standard library only: it starts in ~10 ms)."""
    target = directory / "criu-gate" / "criu"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = f"#!{sys.executable} -IS\n" + Path(criu_gate.__file__).read_text()
    if not target.exists() or target.read_text() != text:
        atomic_write(target, text, 0o755)
    return target


class CriuGate:
    """godwit's end of `godwit.criu_gate`: an abstract Unix socket (nothing on disk to
    leave behind) on which a runc command's CRIU request reports that it waits, and is let
    through or called off. Only a child of that runc process is taken for the shim."""

    def __init__(self, shim: Path) -> None:
        self.shim = shim
        self.name = f"godwit-gate-{secrets.token_hex(8)}"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(f"\0{self.name}")
        self.server.listen(1)
        self.server.setblocking(False)
        self.conn: socket.socket | None = None

    def environment(self) -> dict[str, str]:
        """runc's environment: the shim's directory first on PATH, the gate's name and the
        real CRIU for the shim."""
        real = shutil.which(CRIU) or CRIU
        path = os.pathsep.join([str(self.shim.parent), os.environ.get("PATH", os.defpath)])
        return {"PATH": path, criu_gate.GATE_ENV: f"@{self.name}",
                criu_gate.REAL_CRIU_ENV: real}

    async def wait_held(self, proc: asyncio.subprocess.Process) -> None:
        """Until the CRIU request waits at the gate; RuncError if runc ends first."""
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(self.server))
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({accept, exited}, timeout=HOLD_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            accept.cancel()
        if not accept.done() or accept.cancelled():
            raise RuncError("runc ended before CRIU started" if proc.returncode is not None
                            else f"runc did not reach CRIU in {HOLD_TIMEOUT_S:.0f} s")
        self.conn, _ = accept.result()
        peer, _uid, _gid = struct.unpack("3i", self.conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if procfs.parent(peer) != proc.pid:
            raise RuncError(f"process {peer}, not runc's CRIU, came to the gate")
        self.conn.setblocking(False)
        said = await asyncio.wait_for(loop.sock_recv(self.conn, len(criu_gate.READY)),
                                      HOLD_TIMEOUT_S)
        if said != criu_gate.READY:
            raise RuncError("runc's CRIU call left the gate unexpectedly")

    def open(self) -> None:
        assert self.conn is not None
        self.conn.setblocking(True)
        self.conn.sendall(criu_gate.GO)
        self.close()

    def close(self) -> None:
        """Without a "go", a waiting request is called off (the shim sees the socket close)."""
        if self.conn:
            self.conn.close()
        self.server.close()


class HeldRunc(Generic[T]):
    """A runc checkpoint or restore started ahead of the freeze, its CRIU request waiting
    at a gate: `proceed()` lets CRIU run and returns the command's outcome, `call_off()`
    ends it before CRIU touched anything."""

    def __init__(self, gate: CriuGate, proc: asyncio.subprocess.Process,
                 outcome: Callable[[], Awaitable[T]]) -> None:
        self.gate, self.proc, self.outcome = gate, proc, outcome
        self.released = False

    async def proceed(self) -> T:
        self.release()
        return await self.outcome()

    def release(self) -> None:
        """Let CRIU start; `outcome()` then tells how it ended."""
        self.released = True
        self.gate.open()

    async def call_off(self) -> None:
        """End the command: held, it never starts CRIU; released (a deadline passed, the
        migration was aborted), runc and its CRIU are killed."""
        if self.released:
            await self.kill()
            return
        await self.stop()
        with contextlib.suppress(RuncError, OSError):
            await self.outcome()  # collects output and removes a log file

    async def kill(self) -> None:
        """SIGKILL runc and everything it started (its CRIU, the tasks of a partial
        restore), stopped ones included."""
        for _ in range(2):  # a second pass for what was forked during the first
            runc = [self.proc.pid] if self.proc.returncode is None else []
            for pid in [*procfs.descendants(self.proc.pid), *runc]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        """Close the gate and wait for runc to end (killed if it does not)."""
        self.gate.close()
        try:
            await asyncio.wait_for(self.proc.wait(), CALL_OFF_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


RUNC_VERBS = {"run", "state", "list", "pause", "resume", "kill", "delete", "exec",
              "checkpoint", "restore"}


def _verb(argv: list[str]) -> str:
    """'runc restore' out of a full runc command line."""
    return f"runc {next((a for a in argv[1:] if a in RUNC_VERBS), '')}".strip()


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

    def __init__(self, root: Path, work_dir: Path | None = None,
                 binary: str = DEFAULT_RUNC) -> None:
        """`work_dir` keeps godwit's CRIU gate script and runc's logs (default: beside
        `root`); `binary` is the runc to run."""
        self.root = root
        self.binary = binary
        self.work_dir = work_dir or root.with_name(f"{root.name}-godwit")
        self.log_dir = self.work_dir / "logs"
        self._gate_shim: Path | None = None
        self._version: tuple[tuple[int, int, int], str] | None = None  # (binary's id, version)

    def sweep_logs(self) -> None:
        """At agent start: logs of runc commands the previous agent did not see end."""
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    async def run_detached(self, name: str, bundle: Path) -> None:
        """Create and start a container whose stdio is /dev/null."""
        await _run_detached(self._argv("run", "--detach", "--bundle", str(bundle), name),
                            None, self.log_dir)

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
        """Kill (if needed) and delete a container; a missing one is fine, and what a
        restore killed half way left of it goes too."""
        await self._kill_init(name)
        try:
            await _run(self._argv("delete", "--force", name))
        except RuncError as exc:
            if "does not exist" not in str(exc):
                raise
        await asyncio.to_thread(self._drop_restore_leftovers, name)

    async def _kill_init(self, name: str) -> None:
        """SIGKILL a live container's init through `runc kill` (which thaws a paused one)
        and wait for it to exit. `runc delete --force` alone sleeps 100 ms after its
        SIGKILL before it looks again (runc 1.1): ~110 ms of every migration's cleanup."""
        init = self._init_process(name)
        if init is None:
            return
        pid, started = init
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already
            return
        try:
            if procfs.start_time(pid) != started:  # the pid was reused: not this init
                return
            try:
                await _run(self._argv("kill", name, "KILL"))
            except RuncError:  # stopped meanwhile, or gone: delete sees to it
                return
            with contextlib.suppress(TimeoutError):  # pidfd readable: the init exited
                async with asyncio.timeout(INIT_EXIT_WAIT_S):
                    await wait_readable(pidfd)
        finally:
            os.close(pidfd)

    def _saved_state(self, name: str) -> dict | None:
        """runc's state.json of a container, None if unreadable or not an object."""
        try:
            state = json.loads((self.root / name / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def stdio_descriptors(self, name: str) -> list[str] | None:
        """The container's stdio as runc's state keeps it (`external_descriptors`), which
        is what a checkpoint writes to its descriptors.json; None if the state has none."""
        found = (self._saved_state(name) or {}).get("external_descriptors")
        if isinstance(found, list) and all(isinstance(one, str) for one in found):
            return found
        return None

    def _init_process(self, name: str) -> tuple[int, str] | None:
        """The container's init pid and start time (clock ticks), from runc's state."""
        state = self._saved_state(name)
        try:
            return int(state["init_process_pid"]), str(state["init_process_start"])
        except (KeyError, TypeError, ValueError):
            return None

    def _drop_restore_leftovers(self, name: str) -> None:
        """A `runc restore` killed before it wrote its state leaves its bind mount of the
        rootfs (<root>/<name>/criu-root) and the directory, which runc then no longer
        knows: unmount and remove them."""
        leftover = self.root / name
        if not leftover.is_dir() or (leftover / "state.json").exists():
            return
        tmpfs.release_all_under(leftover)
        shutil.rmtree(leftover, ignore_errors=True)

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

    def _checkpoint_argv(self, name: str, opts: CheckpointOptions, *extra: str) -> list[str]:
        args = ["checkpoint", "--image-path", str(opts.image_path)]
        args += ["--work-path", str(opts.work_path), *extra]
        if opts.leave_running:
            args.append("--leave-running")
        if opts.tcp_established:
            args.append("--tcp-established")
        if opts.pre_dump:
            args.append("--pre-dump")
        if opts.parent_path:
            args += ["--parent-path", str(opts.parent_path)]
        opts.work_path.mkdir(parents=True, exist_ok=True)
        return _logged(self._argv(*args, name), opts.work_path / RUNC_LOG)

    async def checkpoint(self, name: str, opts: CheckpointOptions) -> None:
        """Dump a container with CRIU."""
        await _run(self._checkpoint_argv(name, opts))

    async def hold_checkpoint(self, name: str, opts: CheckpointOptions) -> HeldRunc[str]:
        """`checkpoint`, started now and held just before CRIU's dump."""
        argv = self._checkpoint_argv(name, opts)
        gate = self._new_gate()
        pipe = asyncio.subprocess.PIPE
        proc = await _spawn(argv, gate, stdout=pipe, stderr=pipe, start_new_session=True)
        return await self._held(gate, proc, lambda: _output(proc, argv))

    async def hold_lazy_checkpoint(self, name: str, opts: CheckpointOptions,
                                   page_server: str) -> HeldRunc[asyncio.subprocess.Process]:
        """A dump with lazy pages, held before CRIU starts. Once let through, it returns when
        the small images are written and the page server listens (runc's status fd); the
        process then serves pages until the destination has them all. It runs in its own
        session so that a rollback can kill runc and CRIU."""
        read_end, write_end = os.pipe()  # a write-only status fd, as runc requires
        argv = self._checkpoint_argv(name, opts, "--lazy-pages", "--page-server", page_server,
                                     "--status-fd", str(write_end))
        gate = self._new_gate()
        try:
            proc = await _spawn(argv, gate, pass_fds=(write_end,), start_new_session=True,
                                stdout=asyncio.subprocess.DEVNULL,
                                stderr=asyncio.subprocess.PIPE)
        except BaseException:
            os.close(read_end)
            gate.close()
            raise
        finally:
            os.close(write_end)

        async def serving() -> asyncio.subprocess.Process:
            try:
                ready = await read_status_byte(read_end)
            finally:
                os.close(read_end)
            if ready != b"\0":
                err = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
                await proc.wait()
                raise RuncError(_last_error_line(err) or "lazy checkpoint failed")
            return proc

        return await self._held(gate, proc, serving)

    def _restore_argv(self, name: str, bundle: Path, image_path: Path, work_path: Path,
                      tcp_established: bool, lazy_pages: bool) -> list[str]:
        args = ["restore", "--detach", "--bundle", str(bundle),
                "--pid-file", str(work_path / RESTORED_PID)]
        args += ["--image-path", str(image_path), "--work-path", str(work_path)]
        if tcp_established:
            args.append("--tcp-established")
        if lazy_pages:
            args.append("--lazy-pages")
        work_path.mkdir(parents=True, exist_ok=True)  # runc's log goes there too
        return self._argv(*args, name)

    async def restore(
        self, name: str, bundle: Path, image_path: Path, work_path: Path, *,
        tcp_established: bool = False, lazy_pages: bool = False,
    ) -> int:
        """Restore a container from CRIU images, detached, stdio /dev/null; returns the
        pid of its init process."""
        argv = self._restore_argv(name, bundle, image_path, work_path, tcp_established,
                                  lazy_pages)
        await _run_detached(argv, work_path / RUNC_LOG, self.log_dir)
        return _restored_pid(work_path)

    async def hold_restore(
        self, name: str, bundle: Path, image_path: Path, work_path: Path, *,
        tcp_established: bool = False, lazy_pages: bool = False,
    ) -> HeldRunc[int]:
        """`restore`, started now and held just before CRIU's restore: the rootfs, the
        bundle and the images' descriptors.json must be in place, the other images need
        only be there when it proceeds."""
        argv = self._restore_argv(name, bundle, image_path, work_path, tcp_established,
                                  lazy_pages)
        gate = self._new_gate()
        log, proc = await _spawn_detached(argv, work_path / RUNC_LOG, self.log_dir, gate)

        async def restored() -> int:
            await _detached_outcome(log, proc, argv, keep_log=True)
            return _restored_pid(work_path)

        return await self._held(gate, proc, restored)

    def _new_gate(self) -> CriuGate:
        if self._gate_shim is None:
            self._gate_shim = install_gate(self.work_dir)
        return CriuGate(self._gate_shim)

    @staticmethod
    async def _held(gate: CriuGate, proc: asyncio.subprocess.Process,
                    outcome: Callable[[], Awaitable[T]]) -> HeldRunc[T]:
        """Wait until the command's CRIU request is held; if runc fails before, raise its
        own error."""
        held = HeldRunc(gate, proc, outcome)
        try:
            await gate.wait_held(proc)
        except (RuncError, OSError) as exc:  # TimeoutError is an OSError
            failed_itself = proc.returncode is not None
            await held.stop()
            try:
                await outcome()
            except (RuncError, OSError) as failure:
                if failed_itself:  # runc's own reason is the one to report
                    raise failure from exc
            raise RuncError(str(exc)) from exc
        return held

    async def version(self) -> str:
        """runc's version, asked again only when its binary was replaced (an upgrade)."""
        identity = _file_identity(shutil.which(self.binary) or self.binary)
        if self._version and self._version[0] == identity:
            return self._version[1]
        out = await _run([self.binary, "--version"])
        version = out.splitlines()[0].removeprefix("runc version ").strip() if out else "unknown"
        if identity:
            self._version = (identity, version)
        return version


def _file_identity(path: str) -> tuple[int, int, int] | None:
    """A file's inode, size and mtime: another after it is replaced; None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _restored_pid(work_path: Path) -> int:
    return int((work_path / RESTORED_PID).read_text())


def _state_from_json(raw: dict) -> ContainerState:
    return ContainerState(
        name=raw["id"],
        status=raw.get("status", "unknown"),
        pid=int(raw.get("pid") or 0),
        bundle=raw.get("bundle", ""),
        created=raw.get("created", ""),
    )
