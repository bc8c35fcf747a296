"""Processes as operators run them: non-root users, servers that drop privileges, a task
in stopped state (a job stopped by its shell), and the files they hold (locks, deleted
files, shared mappings, dirty pages on shared storage, set-id bits, capabilities and
extended attributes), migrated with real runc and CRIU."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import cli_json, copies, wait_for

from godwit.lab.bundles import write_bundle
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import build_static

pytestmark = pytest.mark.integration

STRATEGIES = ["stop-and-copy", "post-copy"]
APP_UID, APP_GID, EXTRA_GID = 1000, 1000, 1001
RLIMITS = [{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 1000},
           {"type": "RLIMIT_NPROC", "soft": 300, "hard": 400},
           {"type": "RLIMIT_CORE", "soft": 0, "hard": 4096}]
MIGRATE_TIMEOUT_S = 180  # a dump that hangs must fail the test, not the whole run

# A shell keeps a counter in memory and writes it to /data/count every 100 ms: after a
# migration it goes on from where it was only if its memory moved.
COUNTER_LOOP = ("i=0; while :; do i=$((i+1)); echo $i > /data/count.tmp; "
                "mv /data/count.tmp /data/count; sleep 0.1; done")
# PID 1 stays root and starts the counter as "app", as servers that drop privileges do.
DROPS_PRIVILEGES = ("trap 'exit 0' TERM INT; "
                    f"su -s /bin/sh app -c '{COUNTER_LOOP}' & wait")
# A job stopped by its shell: `sleep` gets SIGSTOP and must still be stopped after the move.
WITH_STOPPED_JOB = ("trap 'exit 0' TERM INT; sleep 100000 & echo $! > /data/stopped.pid; "
                    f"kill -STOP $!; {COUNTER_LOOP}")


def app_bundle(bed: Testbed, name: str, script: str, user: dict | None = None,
               caps: tuple[str, ...] = ()) -> Path:
    """A busybox bundle with a user "app" and a /data directory it owns."""
    bundle = write_bundle(bed.bundle_dir(name), ["/bin/sh", "-c", script])
    rootfs = bundle / "rootfs"
    with (rootfs / "etc/passwd").open("a") as passwd:
        passwd.write(f"app:x:{APP_UID}:{APP_GID}::/data:/bin/sh\n")
    with (rootfs / "etc/group").open("a") as group:
        group.write(f"app:x:{APP_GID}:\nextra:x:{EXTRA_GID}:app\n")
    (rootfs / "data").mkdir()
    os.chown(rootfs / "data", APP_UID, APP_GID)
    (rootfs / "data").chmod(0o777)  # root in the container has no CAP_DAC_OVERRIDE
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["user"] = user or config["process"]["user"]
    config["process"]["rlimits"] = RLIMITS  # below the host's, so each one is visible
    for cap_set in config["process"]["capabilities"].values():
        cap_set.extend(caps)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def start(bed: Testbed, name: str, bundle: Path) -> Path:
    result = bed.godwit("run", name, "--bundle", str(bundle), "--host", "a")
    assert result.returncode == 0, result.stderr
    return rootfs_on(bed, name, "a")


def count(rootfs: Path) -> int:
    try:
        return int((rootfs / "data/count").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def migrate(bed: Testbed, name: str, strategy: str, *options: str) -> dict:
    result = bed.godwit("migrate", name, "--to", "b", "--strategy", strategy, "--json",
                        *options, timeout=MIGRATE_TIMEOUT_S)
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["result"] == "ok", report
    assert copies(bed, name) == [("b", "running")]
    return report


def rootfs_on(bed: Testbed, name: str, host: str) -> Path:
    rows = cli_json(bed, "ps")["containers"]
    return Path(next(r["rootfs"] for r in rows if r["name"] == name and r["host"] == host))


def in_container(bed: Testbed, name: str, *argv: str) -> str:
    result = bed.godwit("exec", name, "--", *argv)
    assert result.returncode == 0, result.stderr
    return result.stdout


def proc_status(bed: Testbed, name: str, pid: int | str) -> dict[str, str]:
    """/proc/PID/status of a process of the container, read inside its pid namespace."""
    text = in_container(bed, name, "cat", f"/proc/{pid}/status")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def counter_pid(bed: Testbed, name: str) -> str:
    """The pid (in the container) of the shell running the counter loop as "app"."""
    listing = in_container(bed, name, "ps", "-o", "pid,user,args")
    rows = [line.split() for line in listing.splitlines()[1:]]
    return next(row[0] for row in rows if row[1] in ("app", str(APP_UID)) and "sh" in row[2])


def assert_counts_on(before: int, rootfs: Path) -> None:
    wait_for(lambda: count(rootfs) > before + 5, what="the counter to go on after the move")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_root_container_migrates(bed: Testbed, strategy: str) -> None:
    """Process user app (uid 1000) with a supplementary group, as a database runs."""
    name = f"nonroot-{strategy}"
    user = {"uid": APP_UID, "gid": APP_GID, "additionalGids": [EXTRA_GID]}
    rootfs = start(bed, name, app_bundle(bed, name, COUNTER_LOOP, user))
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    limits = in_container(bed, name, "cat", "/proc/1/limits")
    migrate(bed, name, strategy)
    at_freeze = count(rootfs)
    assert_counts_on(at_freeze, rootfs_on(bed, name, "b"))
    assert in_container(bed, name, "cat", "/proc/1/limits") == limits
    status = proc_status(bed, name, 1)
    assert status["Uid"].split() == [str(APP_UID)] * 4
    assert status["Gid"].split() == [str(APP_GID)] * 4
    assert status["Groups"].split() == [str(EXTRA_GID)]
    bed.godwit("rm", name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_server_that_drops_privileges_migrates(bed: Testbed, strategy: str) -> None:
    """PID 1 runs as root, its worker as app: tasks of two users in one dump."""
    name = f"drops-{strategy}"
    bundle = app_bundle(bed, name, DROPS_PRIVILEGES, caps=("CAP_SETUID", "CAP_SETGID"))
    rootfs = start(bed, name, bundle)
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    migrate(bed, name, strategy)
    assert_counts_on(count(rootfs), rootfs_on(bed, name, "b"))
    assert proc_status(bed, name, 1)["Uid"].split() == ["0"] * 4
    worker = proc_status(bed, name, counter_pid(bed, name))
    assert worker["Uid"].split() == [str(APP_UID)] * 4
    bed.godwit("rm", name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stopped_task_migrates_and_stays_stopped(bed: Testbed, strategy: str) -> None:
    name = f"stopped-{strategy}"
    rootfs = start(bed, name, app_bundle(bed, name, WITH_STOPPED_JOB))
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    stopped = (rootfs / "data/stopped.pid").read_text().strip()
    assert proc_status(bed, name, stopped)["State"].startswith("T")
    migrate(bed, name, strategy)
    assert_counts_on(count(rootfs), rootfs_on(bed, name, "b"))
    assert proc_status(bed, name, stopped)["State"].startswith("T"), "stopped job was resumed"
    in_container(bed, name, "kill", "-CONT", stopped)
    wait_for(lambda: proc_status(bed, name, stopped)["State"].startswith("S"),
             what="the job to run again after SIGCONT")
    bed.godwit("rm", name)


# A job holding a lock on a file of its rootfs for as long as it runs (flock(2)).
HOLDS_A_LOCK = f"trap 'exit 0' TERM INT; lockfile /data/lock & {COUNTER_LOOP}"
LOCKFILE_SOURCE = Path(__file__).with_name("workloads") / "lockfile.c"


def locker_bundle(bed: Testbed, name: str) -> Path:
    bundle = app_bundle(bed, name, HOLDS_A_LOCK)
    shutil.copy2(build_static(LOCKFILE_SOURCE), bundle / "rootfs/bin/lockfile")
    return bundle


def lock_is_free(bed: Testbed, name: str) -> bool:
    return bed.godwit("exec", name, "--", "lockfile", "-n", "/data/lock").returncode == 0


def test_file_lock_is_carried_with_the_rootfs(bed: Testbed) -> None:
    rootfs = start(bed, "locker", locker_bundle(bed, "locker"))
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    assert not lock_is_free(bed, "locker")
    report = migrate(bed, "locker", "stop-and-copy")
    assert any(f["check"] == "file locks" and "1 held" in f["message"]
               for f in report["preflight"]), report["preflight"]
    assert not lock_is_free(bed, "locker"), "the lock was not taken again on b"
    bed.godwit("rm", "locker")


def test_file_lock_on_shared_storage_is_refused_before_the_freeze(bed: Testbed) -> None:
    rootfs = start(bed, "shlocker", locker_bundle(bed, "shlocker"))
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    result = bed.godwit("migrate", "shlocker", "--to", "b", "--shared-storage", "--json")
    report = json.loads(result.stdout)
    assert result.returncode != 0 and report["result"] == "failed", report
    assert "file lock" in report["error"] and "--shared-storage" in report["error"]
    assert report["frozen_at"] is None, "refused only after freezing"
    assert copies(bed, "shlocker") == [("a", "running")]
    bed.godwit("rm", "shlocker")


# PID 1 holds fd 3 on a 4 MiB file it deleted, as a server does with a log rotated away.
HOLDS_A_DELETED_FILE = ("trap 'exit 0' TERM INT; dd if=/dev/urandom of=/data/old.log bs=1M "
                        f"count=4 2>/dev/null; exec 3</data/old.log; rm /data/old.log; "
                        f"{COUNTER_LOOP}")


def test_deleted_file_held_open_moves_with_its_content(bed: Testbed) -> None:
    rootfs = start(bed, "ghost", app_bundle(bed, "ghost", HOLDS_A_DELETED_FILE))
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    digest = in_container(bed, "ghost", "sha256sum", "/proc/1/fd/3").split()[0]
    migrate(bed, "ghost", "stop-and-copy")
    assert in_container(bed, "ghost", "sha256sum", "/proc/1/fd/3").split()[0] == digest
    assert "(deleted)" in in_container(bed, "ghost", "readlink", "/proc/1/fd/3")
    bed.godwit("rm", "ghost")


# mapwriter counts in /data/mapped through a shared writable mapping, beside the counter.
MAPS_A_FILE = f"trap 'exit 0' TERM INT; mapwriter /data/mapped & {COUNTER_LOOP}"
MAPWRITER_SOURCE = Path(__file__).with_name("workloads") / "mapwriter.c"


def mapped_count(rootfs: Path) -> int:
    """mapwriter's count, as the host's page cache holds /data/mapped."""
    try:
        return int.from_bytes((rootfs / "data/mapped").read_bytes()[:8], "little")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_writes_through_a_shared_mapping_move_with_the_rootfs(bed: Testbed,
                                                              strategy: str) -> None:
    """Writes through a mapped page that is already writable move neither mtime nor ctime:
    the rootfs's passes must carry them all the same, or b's mapping is an older file."""
    name = f"mapper-{strategy}"
    bundle = app_bundle(bed, name, MAPS_A_FILE)
    shutil.copy2(build_static(MAPWRITER_SOURCE), bundle / "rootfs/bin/mapwriter")
    rootfs = start(bed, name, bundle)
    wait_for(lambda: mapped_count(rootfs) >= 100, what="mapwriter to count to 100")
    migrate(bed, name, strategy)
    on_b = rootfs_on(bed, name, "b")
    moved = mapped_count(on_b)
    wait_for(lambda: mapped_count(on_b) > moved + 20,
             what="mapwriter to count on after the move (it exits if its mapping went back)")
    bed.godwit("rm", name)


# A shell writes 64 KiB to /data/held once and keeps it open for writing, beside the counter.
HOLDS_A_WRITTEN_FILE = ("trap 'exit 0' TERM INT; exec 3>/data/held; "
                        f"head -c 65536 /dev/urandom >&3; {COUNTER_LOOP}")
CACHESTAT = 451  # x86_64 syscall number (Linux 6.5)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(field, ctypes.c_uint64) for field in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def dirty_pages(path: Path) -> int:
    """Pages of `path` dirty in this host's page cache (cachestat(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    found = _Cachestat()
    with open(path, "rb") as f:
        if libc.syscall(CACHESTAT, f.fileno(), ctypes.byref(_CachestatRange(0, 0)),
                        ctypes.byref(found), 0):
            raise OSError(ctypes.get_errno(), f"cachestat {path}")
    return found.nr_dirty


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shared_storage_is_written_back_before_the_restore(bed: Testbed,
                                                           strategy: str) -> None:
    """On shared storage (NFS) the destination reads what the source's page cache wrote
    back, no more: the file the container wrote and holds open must be written back
    before b restores from the storage."""
    name = f"writer-{strategy}"
    rootfs = start(bed, name, app_bundle(bed, name, HOLDS_A_WRITTEN_FILE))
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    assert dirty_pages(rootfs / "data/held") > 0, "written back before the test could see"
    report = migrate(bed, name, strategy, "--shared-storage")
    assert dirty_pages(rootfs / "data/held") == 0
    phases = {phase["name"]: phase for phase in report["phases"]}
    assert phases["rootfs-sync"]["ended"] <= phases["restore"]["started"], phases
    bed.godwit("rm", name)


# File capabilities (vfs_cap_data, revision 2): effective, permitted cap_net_bind_service.
CAP_NET_BIND_SERVICE = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


def test_set_id_bits_file_capabilities_and_xattrs_move_with_the_rootfs(bed: Testbed) -> None:
    """A rootfs copied to b is the same files: sudo-like set-id programs, a server binary
    allowed to bind low ports, and extended attributes keep working there."""
    bundle = app_bundle(bed, "meta", COUNTER_LOOP)
    rootfs = bundle / "rootfs"
    shutil.copy2(rootfs / "bin/busybox", rootfs / "bin/setuid-tool")
    os.chmod(rootfs / "bin/setuid-tool", 0o4755)
    shutil.copy2(rootfs / "bin/busybox", rootfs / "bin/low-port-server")
    os.chown(rootfs / "bin/low-port-server", APP_UID, APP_GID)
    os.setxattr(rootfs / "bin/low-port-server", "security.capability", CAP_NET_BIND_SERVICE)
    os.setxattr(rootfs / "data", "user.backup", b"nightly")
    start(bed, "meta", bundle)
    wait_for(lambda: count(rootfs) >= 10, what="counter to reach 10")
    migrate(bed, "meta", "stop-and-copy")
    on_b = rootfs_on(bed, "meta", "b")
    assert on_b != rootfs
    assert os.stat(on_b / "bin/setuid-tool").st_mode & 0o7777 == 0o4755
    server = on_b / "bin/low-port-server"
    assert os.getxattr(server, "security.capability") == CAP_NET_BIND_SERVICE
    assert os.stat(server).st_uid == APP_UID
    assert os.getxattr(on_b / "data", "user.backup") == b"nightly"
    bed.godwit("rm", "meta")
