"""One zdtm static test in a godwit container: a control run or a run through a migration.

The container's rootfs is a busybox one plus the test binary in ``/zdtm/static`` and the
host libraries ``ldd`` names (as zdtm.py's ns flavour copies them), and the ``deps`` of
its .desc. PID 1 is a busybox shell that starts the test the way zdtm.py's make rule does
(same arguments and ZDTM_* environment; the container is the test's namespaces, so no
ZDTM_NEWNS), then reaps and waits. Once the test wrote its pidfile the harness migrates
the container a → b (or not: the control run), sends SIGTERM to the test's pid inside the
container, waits for the .out file and reads PASS from its last line, as zdtm.py does.

The container is privileged the way zdtm's ns flavour is: every capability the host's root
has, no noNewPrivileges, a writable /proc/sys, the host's rlimits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import remove_cgroup
from zdtm_suite import ZdtmTest

from godwit.bundle import oci_config, save_config
from godwit.lab.bundles import make_busybox_rootfs
from godwit.lab.testbed import Testbed

MIGRATE_TIMEOUT_S = 45
CLI_TIMEOUT_S = 60
TEST_DIR_IN_CT = "/zdtm/static"
# Capability names by bit number (linux/capability.h); the container gets those of the
# host's bounding set.
CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
    "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]
LDD_SKIP = re.compile(r"^(linux-gate\.so|linux-vdso(64)?\.so|not a dynamic|.*\s*ldd\s)")

# PID 1: start the test as its make rule would, note how that went, then reap and wait
# (a long sleep: a child exiting during a post-copy transfer fails godwit's page check).
# No IPv6 DAD in the container's netns: a device's link-local address is otherwise
# "tentative" for its first second or two, and a test that snapshots its addresses at
# start (bridge) sees the flag go by itself, migrated or not.
WRAPPER = """\
trap 'exit 0' TERM INT
echo 0 >/proc/sys/net/ipv6/conf/default/accept_dad
cd {cwd}
{exports}
{argv} >/zdtm/start.log 2>&1
echo $? >/zdtm/started.tmp && mv /zdtm/started.tmp /zdtm/started
while :; do sleep 86400 & wait; done
"""


class HarnessError(RuntimeError):
    """A step of a run failed; ``step`` names it (start, migrate, stop, ...)."""

    def __init__(self, step: str, message: str, *, hang: bool = False) -> None:
        super().__init__(message)
        self.step = step
        self.hang = hang


@dataclass
class RunResult:
    """One run of one test: control (strategy None) or through a migration."""

    test: str
    strategy: str | None
    shared_storage: bool = False
    verdict: str = "fail"  # pass | fail | hang | skip
    step: str | None = None  # where it failed: start, migrate, signal, stop, result
    reason: str | None = None
    migration: dict[str, Any] | None = None  # result, error, downtime_s, id
    out_tail: str | None = None
    logs: str | None = None  # dir with the CRIU/runc logs kept for a failure
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    """How a run migrates: no strategy is the control run."""

    strategy: str | None = None
    shared_storage: bool = False

    @property
    def label(self) -> str:
        if self.strategy is None:
            return "control"
        return self.strategy + (" --shared-storage" if self.shared_storage else "")


# ------------------------------------------------------------------------ bundle


def host_capabilities() -> list[str]:
    """CAP_* names in this process's bounding set (root here lacks CAP_SYS_RESOURCE)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            mask = int(line.split()[1], 16)
            return [f"CAP_{n}" for bit, n in enumerate(CAPABILITIES) if mask >> bit & 1]
    return []


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries ldd lists for a binary (vdso excluded), as zdtm.py collects them."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    libs = []
    for line in done.stdout.splitlines():
        if not line.startswith("\t") or LDD_SKIP.match(line.strip()):
            continue
        parts = line.split()
        libs.append(Path(parts[2] if len(parts) > 2 and parts[1] == "=>" else parts[0]))
    return libs


def copy_into(rootfs: Path, path: Path) -> None:
    """Copy a host file to the same path in rootfs (replacing a busybox applet link)."""
    target = rootfs / str(path).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    shutil.copy2(path, target)


def copy_with_libs(rootfs: Path, binary: Path) -> None:
    copy_into(rootfs, binary)
    for lib in shared_libraries(binary):
        if not lib.exists():
            raise HarnessError("bundle", f"library {lib} of {binary} missing")
        copy_into(rootfs, lib)


def copy_deps(rootfs: Path, deps: list[str]) -> None:
    """Each dep is 'a|b|...': the first that exists, with its libraries (zdtm.py's rule)."""
    for dep in deps:
        found = next((Path(d) for d in dep.split("|") if Path(d).exists()), None)
        if not found:
            raise HarnessError("bundle", f"dependency {dep} not on this host")
        copy_with_libs(rootfs, found)


def wrapper_script(test: ZdtmTest, as_root: bool) -> str:
    env = test.env(as_root=as_root)
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    return WRAPPER.format(cwd=TEST_DIR_IN_CT, exports=exports, argv=shlex.join(test.argv))


def zdtm_config(hostname: str) -> dict[str, Any]:
    """runc config: PID 1 the wrapper, privileged like zdtm's ns flavour."""
    config = oci_config(["/bin/sh", "/zdtm/run.sh"], cwd=TEST_DIR_IN_CT, hostname=hostname)
    process = config["process"]
    caps = host_capabilities()
    process["capabilities"] = {k: list(caps) for k in ("bounding", "effective", "permitted")}
    process["noNewPrivileges"] = False
    process.pop("rlimits", None)  # the host's, as zdtm.py's tests get them
    config["linux"]["readonlyPaths"] = []
    return config


def make_bundle(bundle: Path, test: ZdtmTest, test_dir: Path, *, as_root: bool) -> Path:
    """An OCI bundle that runs TEST under the wrapper."""
    shutil.rmtree(bundle, ignore_errors=True)
    rootfs = bundle / "rootfs"
    make_busybox_rootfs(rootfs, hostname="zdtm")
    static = rootfs / TEST_DIR_IN_CT.lstrip("/")
    static.mkdir(parents=True)
    static.chmod(0o777)  # zdtm.py's __add_wperms: a non-root test writes .out and .pid here
    shutil.copy2(test_dir / "zdtm" / "static" / test.name, static / test.name)
    for lib in shared_libraries(static / test.name):
        copy_into(rootfs, lib)
    copy_deps(rootfs, test.deps)
    (rootfs / "zdtm" / "run.sh").write_text(wrapper_script(test, as_root))
    save_config(bundle, zdtm_config("zdtm"))
    return bundle


# ------------------------------------------------------------------------ logs


class LogCatcher(threading.Thread):
    """Hard-links every CRIU/runc log (``*.log``) that appears in the hosts' state dirs
    while a run goes on: godwit deletes a migration's work dir (dump.log) and runc's logs
    when it ends, a link keeps the file, written to the end. ``keep`` copies them out."""

    POLL_S = 0.05

    def __init__(self, bed: Testbed, name: str) -> None:
        super().__init__(daemon=True)
        self.roots = {host: bed.host(host).state_dir for host in bed.names}
        self.links = bed.net.base_dir / "zdtm-logs" / name
        self.done = threading.Event()
        self.seen: set[tuple[int, int]] = set()

    def run(self) -> None:
        while not self.done.wait(self.POLL_S):
            self.catch()
        self.catch()

    def catch(self) -> None:
        for host, root in self.roots.items():
            for top, dirs, files in os.walk(root):
                dirs[:] = [d for d in dirs if d not in ("rootfs", "images")]
                for file in files:
                    if file.endswith(".log") and file != "agent.log":
                        self.link(host, root, Path(top) / file)

    def link(self, host: str, root: Path, path: Path) -> None:
        with contextlib.suppress(OSError):
            st = path.stat()
            if (st.st_dev, st.st_ino) in self.seen:
                return
            target = self.links / host / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
            self.seen.add((st.st_dev, st.st_ino))

    def stop(self) -> None:
        self.done.set()
        self.join()

    def keep(self, dest: Path) -> str | None:
        """Copy the caught logs to DEST; drop the links."""
        if self.links.exists():
            shutil.copytree(self.links, dest, dirs_exist_ok=True)
        self.discard()
        return str(dest) if dest.exists() else None

    def discard(self) -> None:
        shutil.rmtree(self.links, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.links.parent.rmdir()  # the last run leaves the testbed's dir empty


# ------------------------------------------------------------------------ one run


@dataclass
class TestRun:
    """A container running one test on a testbed, and the steps on it."""

    bed: Testbed
    test: ZdtmTest
    name: str
    bundle: Path
    started: float = field(default_factory=time.monotonic)

    def godwit(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        try:
            return self.bed.godwit(*args, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(args[0], f"godwit {args[0]} took over {timeout:.0f} s",
                               hang=True) from None

    def checked(self, *args: str, step: str) -> subprocess.CompletedProcess:
        done = self.godwit(*args)
        if done.returncode != 0:
            raise HarnessError(step, f"godwit {args[0]}: {done.stderr.strip()[-300:]}")
        return done

    def rootfs(self) -> Path:
        rows = json.loads(self.checked("ps", "--json", step="ps").stdout)["containers"]
        found = [r for r in rows if r["name"] == self.name]
        if not found:
            raise HarnessError("ps", f"{self.name} is on no host")
        return Path(found[0]["rootfs"])

    def start(self) -> str:
        """Run the container on a; wait for the test's pidfile; return the pid."""
        self.checked("run", self.name, "--bundle", str(self.bundle), "--host", "a", step="start")
        static = self.bundle / "rootfs" / TEST_DIR_IN_CT.lstrip("/")
        started = self.bundle / "rootfs" / "zdtm" / "started"
        pidfile = static / f"{self.test.name}.pid"

        def ready() -> str | None:
            if pidfile.exists() and (pid := pidfile.read_text().strip()):
                return pid
            if started.exists() and started.read_text().strip() not in ("", "0"):
                raise HarnessError("start", "test did not start: " + self.start_log())
            return None

        return poll(ready, self.test.timeout, "start", f"pidfile {pidfile.name}")

    def start_log(self) -> str:
        log = self.bundle / "rootfs" / "zdtm" / "start.log"
        text = log.read_text(errors="replace").strip() if log.exists() else ""
        static = self.bundle / "rootfs" / TEST_DIR_IN_CT.lstrip("/")
        return " | ".join([*text.splitlines()[-3:], *out_tail(static, self.test.name, 3)])

    def migrate(self, variant: Variant) -> dict[str, Any]:
        args = ["migrate", self.name, "--to", "b", "--json", "--strategy", str(variant.strategy)]
        args += ["--shared-storage"] if variant.shared_storage else []
        done = self.godwit(*args, timeout=MIGRATE_TIMEOUT_S)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            raise HarnessError("migrate", f"no report: {done.stderr.strip()[-300:]}") from None
        summary = {k: report.get(k) for k in ("id", "result", "error", "outcome", "downtime_s")}
        if report.get("result") != "ok":
            raise MigrationFailed(summary)
        return summary

    def stop(self, pid: str, *, moved: bool) -> list[str]:
        """SIGTERM to the test; wait for its .out; its last lines."""
        done = self.godwit("exec", self.name, "--", "kill", "-TERM", pid)
        if done.returncode != 0:
            raise HarnessError("signal", f"kill -TERM {pid}: {(done.stdout + done.stderr)[-300:]}")
        static = (self.rootfs() if moved else self.bundle / "rootfs") / TEST_DIR_IN_CT.lstrip("/")
        out = static / f"{self.test.name}.out"
        poll(out.exists, self.test.timeout, "stop", f"{out.name} after SIGTERM")
        return out_tail(static, self.test.name, 5)

    def remove(self, *, thaw: bool) -> None:
        """Remove it; after a failure first thaw every copy (a hung dump leaves it frozen)."""
        if not thaw:
            thaw = self.godwit("rm", self.name, timeout=30).returncode != 0
        for host in self.bed.names if thaw else ():
            with contextlib.suppress(HarnessError):
                self.godwit("resume", self.name, "--host", host, timeout=30)
            with contextlib.suppress(HarnessError):
                self.godwit("rm", self.name, "--host", host, timeout=30)
        for host in self.bed.names:
            remove_cgroup(f"/godwit/{host}/{self.name}")
        shutil.rmtree(self.bundle, ignore_errors=True)


class MigrationFailed(HarnessError):
    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__("migrate", str(summary.get("error") or summary.get("outcome")))
        self.summary = summary


def poll(probe: Callable[[], Any], timeout: float, step: str, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise HarnessError(step, f"no {what} within {timeout:.0f} s", hang=True)


def out_tail(static: Path, name: str, lines: int) -> list[str]:
    for suffix in (".out", ".out.inprogress"):
        path = static / f"{name}{suffix}"
        if path.exists():
            return path.read_text(errors="replace").strip().splitlines()[-lines:]
    return []


def passed(tail: list[str]) -> bool:
    """zdtm.py: PASS is a word of the .out's last line."""
    return bool(tail) and "PASS" in tail[-1].split()


def run_test(bed: Testbed, test: ZdtmTest, test_dir: Path, variant: Variant, *,
             name: str, logs_dir: Path, as_root: bool = False) -> RunResult:
    """One run of TEST in a fresh container; never raises for a test or godwit failure."""
    result = RunResult(test.name, variant.strategy, variant.shared_storage)
    bed.widen_policy(capabilities=host_capabilities())  # privileged like zdtm's ns flavour
    try:
        bundle = make_bundle(bed.bundle_dir(name), test, test_dir, as_root=as_root)
    except (HarnessError, OSError, subprocess.SubprocessError) as exc:
        result.step, result.reason = "bundle", str(exc)
        shutil.rmtree(bed.bundle_dir(name), ignore_errors=True)
        return result
    run = TestRun(bed, test, name, bundle)
    catcher = LogCatcher(bed, name)
    if variant.strategy:
        catcher.start()
    try:
        pid = run.start()
        if variant.strategy:
            result.migration = run.migrate(variant)
        tail = run.stop(pid, moved=bool(variant.strategy))
        result.out_tail = "\n".join(tail)
        result.verdict = "pass" if passed(tail) else "fail"
        result.step = None if result.verdict == "pass" else "result"
        result.reason = None if result.verdict == "pass" else (tail[-1] if tail else "no .out")
    except HarnessError as exc:
        if isinstance(exc, MigrationFailed):
            result.migration = exc.summary
        result.verdict = "hang" if exc.hang else "fail"
        result.step, result.reason = exc.step, str(exc)
        with contextlib.suppress(HarnessError, OSError):
            result.out_tail = "\n".join(out_tail(run.rootfs() / TEST_DIR_IN_CT.lstrip("/"),
                                                 test.name, 5))
    finally:
        run.remove(thaw=result.verdict != "pass")
        if variant.strategy:
            catcher.stop()
            result.logs = catcher.keep(logs_dir / name) if result.verdict != "pass" else None
            catcher.discard()
        result.seconds = round(time.monotonic() - run.started, 2)
    return result
