"""The local CRIU: what it can do (version, `criu check`, lazy pages, dirty-memory
tracking), the options godwit gives every dump and restore, the host settings that keep
its fixed costs small, and the lazy-pages daemon of post-copy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from godwit import procfs
from godwit.cgroups import CGROUP_ROOT
from godwit.errors import GodwitError
from godwit.tls import TLSFiles

CRIU = os.environ.get("GODWIT_CRIU", "criu")
KDAT_DIR = Path("/run/criu")  # the RUNDIR godwit's CRIU build keeps its kerndat cache in
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
DUMP_PIPE_BYTES = 4 << 20  # CRIU fills pipes of up to ~800 pages: allow that, not 1 MiB


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
    """Ask the local CRIU what it supports (its options read now, not in a migration)."""
    version = await _version()
    await asyncio.to_thread(criu_usage)
    rc, out = await run_criu("check")
    lazy, dirty = await asyncio.gather(_feature("uffd-noncoop"), _feature("mem_dirty_track"))
    message = out.splitlines()[-1] if out else ""
    return CriuCapabilities(version, rc == 0, message, lazy, dirty)




# Deleted files a container still holds open travel inside the images; CRIU refuses any
# larger than 1 MiB by default, e.g. a log file rotated away from a server that keeps it.
GHOST_LIMIT = "256M"
LOG_LEVEL = 3  # CRIU's info level: errors, warnings and each step, no debug lines
LOG_LEVELS = {"info": LOG_LEVEL, "debug": 4}  # the agent's --criu-log-level
_dump_restore_log = {"level": LOG_LEVEL}


def set_log_level(name: str) -> None:
    """The level of CRIU's logs in this process's dumps and restores from now on."""
    _dump_restore_log["level"] = LOG_LEVELS[name]


def criu_base_options() -> list[str]:
    """CRIU options for every dump and restore, which runc cannot pass (they go in the
    container's org.criu.config file).

    CRIU's network lock runs iptables-restore five times per dump and per restore (~70 ms
    each way, all of it frozen); godwit does that job itself: the source copy is cut off
    the network before its dump, and the destination holds arriving packets until the
    restore has finished (godwit.packet_hold.PacketHold); a non-networked container has only
    loopback. And CRIU mounts every cgroup hierarchy afresh (~20 ms) unless it is given
    a "yard" where they already are. File locks and deleted open files (ghosts, up to
    GHOST_LIMIT each) are carried.

    CRIU stops a task leaving its parasite (dump) or restorer (restore) at a hardware
    breakpoint. While no task on the host holds a perf event, registering one enables the
    kernel's perf scheduling hooks (a static key and an RCU grace period): 5-30 ms of the
    freeze here. Where CRIU has NO_BREAKPOINTS it steps the few system calls left instead
    (~0.2 ms).

    runc asks CRIU for debug logging (level 4) in every request; with scripts/criu-patches/
    0025 this file's level applies instead, info unless set_log_level() said debug: info
    keeps each step's lines and drops the debug ones, six per page-pipe iov of a lazy dump
    (~15 ms of the freeze at 8 GiB)."""
    options = ["network-lock skip", "file-locks", f"ghost-limit {GHOST_LIMIT}",
               f"verbosity={_dump_restore_log['level']}"]
    if cgroup_yard():
        options.append(f"cgroup-yard {CGROUP_ROOT}")
    if criu_has_option(NO_BREAKPOINTS):
        options.append(NO_BREAKPOINTS.removeprefix("--"))
    return options


@functools.cache
def cgroup_yard() -> bool:
    """Is every cgroup hierarchy mounted under /sys/fs/cgroup where CRIU would look for
    it in a yard (<controllers>, "systemd" for name=systemd, "unified" for v2)?"""
    mounts = {point for point, kind, _ in procfs.mounts() if kind in ("cgroup", "cgroup2")}
    wanted = set()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        controllers = line.split(":")[1]
        wanted.add(controllers.removeprefix("name=") or "unified")
    return all(str(CGROUP_ROOT / name) in mounts for name in wanted)


def tune_host() -> list[str]:
    """Make CRIU's fixed costs small; returns what was changed (or could not be).

    CRIU probes the kernel at every start (~25 ms) unless it can cache the result on a
    tmpfs; a dump copies pages through pipes no larger than fs.pipe-max-size (one
    round trip to the parasite per pipe: 1 MiB pipes mean 2,000 for 2 GiB); and moving a
    task into a cgroup v2 waits for an RCU grace period (~10 ms, in every restore) unless
    the hierarchy is mounted with favordynmods, the kernel's setting for hosts whose
    cgroups change often."""
    changes = [*_favor_cgroup_moves()]
    try:
        KDAT_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        if procfs.fs_type(KDAT_DIR) != "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "godwit-criu",
                            str(KDAT_DIR)], check=True, capture_output=True)
            changes.append(f"mounted a tmpfs on {KDAT_DIR} for CRIU's kernel-probe cache")
    except (OSError, subprocess.CalledProcessError) as exc:
        changes.append(f"no kernel-probe cache for CRIU (slower dumps): {exc}")
    try:
        if int(PIPE_MAX_SIZE.read_text()) < DUMP_PIPE_BYTES:
            PIPE_MAX_SIZE.write_text(str(DUMP_PIPE_BYTES))
            changes.append(f"raised fs.pipe-max-size to {DUMP_PIPE_BYTES}")
    except OSError as exc:
        changes.append(f"fs.pipe-max-size left as is (slower dumps): {exc}")
    return changes


def _favor_cgroup_moves() -> list[str]:
    changes = []
    for point, kind, options in procfs.mounts():
        if kind != "cgroup2" or "favordynmods" in options:
            continue
        result = subprocess.run(["mount", "-o", "remount,favordynmods", point],
                                capture_output=True, text=True)
        changes.append(f"cgroup2 at {point} remounted with favordynmods" if result.returncode == 0
                       else f"cgroup2 at {point} left as is (slower restores): "
                            f"{result.stderr.strip() or result.returncode}")
    return changes


LAZY_LOG = "lazy-pages.log"
LAZY_START_TIMEOUT_S = 5
LAZY_SOCKET = "lazy-pages.socket"  # in its work dir, where `runc restore --lazy-pages` looks
# Per restored task "PID-FD: ..." (the fd is negated once the task has exited).
_TRANSFERRED = re.compile(r"(\d+)--?\d+: UFFD transferred pages: \((\d+)/(\d+)\)")
_EXITED = re.compile(r"(\d+)--?\d+: EXIT$", re.MULTILINE)


def tls_argv(tls: TLSFiles | None, *, check_peer_name: bool = True) -> list[str]:
    """CRIU's command-line options for a TLS connection with godwit's identity; a server
    checks no peer name (CRIU would match the client against its own address)."""
    if not tls:
        return []
    argv = ["--tls", "--tls-cacert", str(tls.ca), "--tls-cert", str(tls.cert),
            "--tls-key", str(tls.key)]
    if tls.crl:
        argv += ["--tls-cacrl", str(tls.crl)]
    return argv if check_peer_name else [*argv, "--tls-no-cn-verify"]


def tls_config_lines(tls: TLSFiles | None, *, check_peer_name: bool = True) -> list[str]:
    """The same options as lines of a CRIU config file (runc passes none of them)."""
    lines: list[str] = []
    for arg in tls_argv(tls, check_peer_name=check_peer_name):
        if arg.startswith("--"):
            lines.append(arg.removeprefix("--"))
        else:
            lines[-1] += f" {arg}"
    return lines


async def wait_readable(fd: int) -> None:
    """Wait in the event loop until `fd` is readable (a cancelled wait leaves no thread
    blocked on it)."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(fd)


async def read_status_byte(fd: int) -> bytes:
    """One byte from a status pipe, waited for in the event loop; b"" when the write end
    closed."""
    os.set_blocking(fd, False)
    await wait_readable(fd)
    return os.read(fd, 1)


PAGE_SERVER_LOG = "page-server.log"
PAGE_SERVER_START_TIMEOUT_S = 5


async def start_page_server(images: Path, work: Path, address: str, port: int,
                            tls: TLSFiles | None, peer: str | None) -> asyncio.subprocess.Process:
    """Destination side of a streamed stop-and-copy dump: CRIU's page server, which takes
    one dump's connection and writes its memory pages (pagemap and pages images) into
    `images`, then exits (0 once the dump flushed and closed it). Returns once it listens.
    With `peer`, only a client whose certificate names it is served (`--tls-peer-name`,
    scripts/criu-patches/0012), else any certificate of the CA."""
    tls_options = [*tls_argv(tls), "--tls-peer-name", peer] if tls and peer else \
        tls_argv(tls, check_peer_name=False)
    read_end, write_end = os.pipe()  # CRIU writes \0 to its status fd once it listens
    argv = [CRIU, "page-server", "--images-dir", str(images), "--work-dir", str(work),
            "--address", address, "--port", str(port), "--status-fd", str(write_end),
            "-v2", "-o", PAGE_SERVER_LOG, *tls_options]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, pass_fds=(write_end,), start_new_session=True)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    try:
        async with asyncio.timeout(PAGE_SERVER_START_TIMEOUT_S):
            ready = await read_status_byte(read_end)
    except TimeoutError:
        ready = b""
    finally:
        os.close(read_end)
    if ready != b"\0":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        cause = log_error(work, PAGE_SERVER_LOG) or f"exit code {proc.returncode}"
        raise GodwitError(f"criu page-server did not start: {cause}")
    return proc


@functools.cache
def criu_usage() -> str:
    """The local CRIU's --help text, read once ("" if it cannot run)."""
    try:
        return subprocess.run([CRIU, "--help"], capture_output=True, text=True,
                              check=False).stdout
    except OSError:
        return ""


def criu_has_option(option: str) -> bool:
    """Does the local CRIU take `option` (its --help lists it)?"""
    return option in criu_usage()


START_BEFORE_IMAGES = "--start-before-images"  # scripts/criu-patches/0022
NO_BREAKPOINTS = "--no-breakpoints"  # scripts/criu-patches/0023


async def start_lazy_pages(images: Path, work: Path, page_server: str | None,
                           tls: TLSFiles | None, *,
                           before_images: bool = False) -> asyncio.subprocess.Process:
    """The daemon that fills a lazily restored process's memory (userfaultfd): from the
    source's page server (post-copy), or with `page_server` None from the pages already
    in `images` (stop-and-copy's restore, whose memory copy then runs after the freeze).
    `runc restore --lazy-pages` must use the same work dir, where the daemon's socket
    appears once it is ready. With `before_images` (a CRIU with START_BEFORE_IMAGES) it
    reads the images and reaches the page server only once the restore connects: it can
    be started before the dump."""
    argv = [CRIU, "lazy-pages", "-D", str(images), "-W", str(work), "-v4", "-o", LAZY_LOG]
    if before_images:
        argv.append(START_BEFORE_IMAGES)
    if page_server:
        address, _, port = page_server.rpartition(":")
        argv += ["--page-server", "--address", address, "--port", port, *tls_argv(tls)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + LAZY_START_TIMEOUT_S
    listening = False
    while time.monotonic() < deadline:  # it takes ~10 ms, all of it frozen: poll closely
        # Its socket file appears at bind(), before listen(): a restore connecting in
        # between is refused, so wait for the listening socket itself.
        listening = proc.returncode is None and _lazy_socket_listens(proc.pid)
        if listening or proc.returncode is not None:
            break
        await asyncio.sleep(0.002)
    if not listening:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise GodwitError(f"criu lazy-pages did not start: {lazy_pages_verdict(work)[1]}")
    return proc


def _lazy_socket_listens(pid: int) -> bool:
    """The daemon (`pid`, or a process under it when GODWIT_CRIU is a wrapper) listens."""
    if procfs.unix_listening(pid, LAZY_SOCKET):
        return True
    if procfs.command_name(pid) in (None, "criu"):
        return False  # no wrapper: don't scan /proc every poll while the container is frozen
    return any(procfs.unix_listening(child, LAZY_SOCKET) for child in procfs.descendants(pid))


def lazy_pages_verdict(work: Path) -> tuple[bool, str]:
    """Did the lazy-pages daemon deliver every page a task still needs? Its exit code alone
    does not tell: it also exits 0 when it gave up part-way. A task that exited during the
    transfer (a short-lived child, a finished job) needs no more pages; any other task must
    have them all."""
    try:
        log = (work / LAZY_LOG).read_text(errors="replace")
    except FileNotFoundError:
        return False, "no lazy-pages log"
    counts = [(int(pid), int(done), int(total)) for pid, done, total in _TRANSFERRED.findall(log)]
    if not counts:
        return False, root_cause(log) or "no page was transferred"
    exited = {int(pid) for pid in _EXITED.findall(log)}
    short = [(done, total) for pid, done, total in counts if done != total and pid not in exited]
    if short:
        done, total = (sum(column) for column in zip(*short, strict=True))
        return False, f"pages missing: {done}/{total} of {len(short)} running task(s)"
    moved = sum(done for _, done, _ in counts)
    return True, f"{moved} pages transferred" + (f", {len(exited)} task(s) exited meanwhile"
                                                 if exited else "")


# What CRIU logs at its start on hosts like these and then carries on from: root without
# CAP_SYS_RESOURCE cannot raise CRIU's own open-files limit (util.c, every dump and restore).
NON_FATAL_ERRORS = (re.compile(r"rlimit: Can't setup RLIMIT_NOFILE for self"),)
CHAIN_GAP_LINES = 50  # more lines than this between two errors: not one failure going up
_ERROR_LINE = re.compile(r"Error \(([^)]*)\): (.*)$")
_TASK_PREFIX = re.compile(r"^\([\d.]+\)\s+(\d+): |^pie: (\d+): ")


def root_cause(log: str) -> str | None:
    """The error CRIU gives for the failure in a dump, restore or lazy-pages log, not merely
    its first "Error" line.

    CRIU reports a failure where it happens, then again in each caller on the way up ("Dump
    files (pid: 7) failed with -1", a parent task's "6 exited, status=1"), then "Dumping
    FAILED." (or Restoring, Pre-dumping, Lazy pages transfer). So: errors after that
    summary are cleanup noise (a restore's "cgroupd: recv req error"); known non-fatal
    errors are skipped; of the errors left, the final failure chain is the last run of
    errors at most CHAIN_GAP_LINES apart, counting only the lines of the tasks that logged
    the two errors (a restore's tasks log side by side: hundreds of other tasks' lines may
    come between a child's error and its parent's report of it). The chain's first error
    is the cause; without any other error, the summary itself."""
    lines = log.splitlines()
    errors = [(n, match.group(2).strip()) for n, line in enumerate(lines)
              if (match := _ERROR_LINE.search(line))]
    summaries = [i for i, (_, message) in enumerate(errors) if message.endswith("FAILED.")]
    summary = errors[summaries[-1]][1] if summaries else None
    if summaries:
        errors = errors[:summaries[-1]]
    causes = [(n, message) for n, message in errors
              if not message.endswith("FAILED.")
              and not any(pattern.search(message) for pattern in NON_FATAL_ERRORS)]
    if not causes:
        return summary
    tasks = [_task(line) for line in lines]
    first = len(causes) - 1
    while first > 0:
        (before, _), (after, _) = causes[first - 1], causes[first]
        involved = {tasks[before], tasks[after]}
        if sum(1 for task in tasks[before + 1:after] if task in involved) > CHAIN_GAP_LINES:
            break
        first -= 1
    return causes[first][1]


def _task(line: str) -> str:
    """Which restored task (or parasite) logged a line; "" for CRIU's main process."""
    match = _TASK_PREFIX.match(line)
    return (match.group(1) or match.group(2)) if match else ""


def log_error(work: Path, log_name: str) -> str | None:
    """The root cause of a failure, from a CRIU log in its work dir (runc only says
    "criu failed")."""
    try:
        return root_cause((work / log_name).read_text(errors="replace"))
    except FileNotFoundError:
        return None
