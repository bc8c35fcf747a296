"""End-to-end stop-and-copy migrations between netns hosts, with real runc and CRIU."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import cli_json, copies, wait_for

from godwit.bundle import load_config, save_config
from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import memhog_bundle, read_state
from godwit.runc import DEFAULT_RUNC

pytestmark = pytest.mark.integration


def start(bed: Testbed, name: str, bundle: Path, host: str = "a") -> None:
    result = bed.godwit("run", name, "--bundle", str(bundle), "--host", host)
    assert result.returncode == 0, result.stderr


def rootfs_of(bed: Testbed, name: str) -> Path:
    rows = cli_json(bed, "ps")["containers"]
    return Path(next(r["rootfs"] for r in rows if r["name"] == name))


def migrate(bed: Testbed, name: str, to: str, *extra: str) -> tuple[int, dict]:
    result = bed.godwit("migrate", name, "--to", to, "--json", *extra)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}


def remove(bed: Testbed, name: str) -> None:
    bed.godwit("rm", name)


def test_counter_keeps_its_memory_across_migration(any_bed: Testbed) -> None:
    bed = any_bed
    start(bed, "counter", counter_bundle(bed.bundle_dir("counter")))
    source_rootfs = rootfs_of(bed, "counter")
    wait_for(lambda: (read_count(source_rootfs) or 0) >= 20, what="counter to reach 20")
    code, report = migrate(bed, "counter", "b")
    assert code == 0 and report["result"] == "ok", report
    assert copies(bed, "counter") == [("b", "running")]
    at_freeze = read_count(source_rootfs)
    dest_rootfs = rootfs_of(bed, "counter")
    assert dest_rootfs != source_rootfs, "rootfs should have been transferred"
    # A restarted shell would count from 1 again; a migrated one goes on from where it was.
    after = wait_for(lambda: (c := read_count(dest_rootfs)) and c > at_freeze + 5 and c,
                     what="counter to continue on b")
    assert after > at_freeze >= 20
    assert report["rootfs_bytes"] > 0 and report["image_bytes"] > 0
    assert 0 < report["downtime_s"] < report["total_s"]
    remove(bed, "counter")


def godwit_netns(bed: Testbed, name: str) -> str | None:
    """The /run/netns name of the container's netns (None: a netns runc made), checking
    that its loopback is up."""
    pid = next(r["pid"] for r in cli_json(bed, "ps")["containers"] if r["name"] == name)
    inode = Path(f"/proc/{pid}/ns/net").stat().st_ino
    found = [p.name for p in Path("/run/netns").iterdir() if p.stat().st_ino == inode]
    if not found:
        return None
    lo = subprocess.run(["ip", "-n", found[0], "-o", "link", "show", "lo"],
                        capture_output=True, text=True, check=True).stdout
    assert "UP" in lo.split(">")[0], lo
    return found[0]


# A container without an address configures its own netns (an address and a route on lo)
# and keeps a TCP connection over loopback streaming numbers into /tcp.log.
OWN_NETNS_SCRIPT = (
    "ip addr add 10.99.0.7/32 dev lo && ip route add 10.98.0.0/24 dev lo || exit 1; "
    "sleep 100000 | nc -l -p 5000 > /tcp.log & sleep 0.5; "
    "(i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done) | nc 127.0.0.1 5000 & "
    "trap 'exit 0' TERM; while :; do sleep 1; done"
)


def last_number(path: Path) -> int:
    lines = path.read_text().split() if path.exists() else []
    return int(lines[-1]) if lines else 0


def test_container_that_cannot_change_its_netns_gets_one_of_godwits(bed: Testbed) -> None:
    """Without CAP_NET_ADMIN there is nothing in the netns to carry: godwit's loopback-only
    netns, external to CRIU (nothing of it in the freeze), on a and again on b."""
    name = "plain-lo"
    bundle = counter_bundle(bed.bundle_dir(name))
    start(bed, name, bundle)
    assert godwit_netns(bed, name) is not None, "godwit's netns in /run/netns"
    code, report = migrate(bed, name, "b")
    assert code == 0, report.get("error")
    assert godwit_netns(bed, name) is not None
    remove(bed, name)


def net_admin_bundle(bed: Testbed, name: str, script: str | None = None) -> Path:
    """A counter bundle with CAP_NET_ADMIN (it may change its netns, so CRIU carries it),
    running `script` instead of the counter when given."""
    bundle = counter_bundle(bed.bundle_dir(name))
    config = load_config(bundle)
    if script:
        config["process"]["args"] = ["/bin/sh", "-c", script]
    for caps in config["process"]["capabilities"].values():
        caps.append("CAP_NET_ADMIN")
    save_config(bundle, config)
    return bundle


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy"])
def test_container_without_address_carries_its_own_netns_config(
        bed: Testbed, strategy: str) -> None:
    """runc makes its netns and CRIU dumps and restores it: the address and route the
    container added are there on b, and its loopback TCP connection goes on."""
    name = f"loner-{strategy}"
    bundle = net_admin_bundle(bed, name, OWN_NETNS_SCRIPT)
    start(bed, name, bundle)
    assert godwit_netns(bed, name) is None, "runc's netns, not one in /run/netns"
    wait_for(lambda: last_number(bundle / "rootfs/tcp.log") >= 5, what="loopback stream")
    code, report = migrate(bed, name, "b", "--strategy", strategy)
    assert code == 0, report.get("error")
    assert godwit_netns(bed, name) is None
    addresses = bed.godwit("exec", name, "--", "ip", "-4", "-o", "addr", "show", "lo")
    assert "10.99.0.7/32" in addresses.stdout, addresses
    routes = bed.godwit("exec", name, "--", "ip", "route", "show")
    assert "10.98.0.0/24 dev lo" in routes.stdout, routes
    on_b = rootfs_of(bed, name) / "tcp.log"
    moved = last_number(on_b)
    wait_for(lambda: last_number(on_b) > moved + 5, what="loopback stream going on on b")
    remove(bed, name)


def test_netns_with_a_veth_to_the_host_is_refused_before_the_freeze(bed: Testbed) -> None:
    """Its peer would stay behind: pre-flight names it, nothing is frozen."""
    start(bed, "linked", net_admin_bundle(bed, "linked"))
    pid = next(r["pid"] for r in cli_json(bed, "ps")["containers"] if r["name"] == "linked")
    add = bed.net.run_in("a", ["ip", "link", "add", f"{bed.prefix}l", "type", "veth",
                               "peer", "name", "eth1", "netns", str(pid)])
    assert add.wait(timeout=30) == 0
    code, report = migrate(bed, "linked", "b")
    assert code != 0 and report["result"] == "failed", report
    assert "interface eth1 (veth) linked to a namespace outside" in report["error"], report
    assert "freeze" not in [p["name"] for p in report["phases"]], report["phases"]
    assert copies(bed, "linked") == [("a", "running")]
    remove(bed, "linked")


@pytest.mark.parametrize("eager", [False, True], ids=["filled-after-restore", "eager"])
def test_256_mib_memory_is_preserved(bed: Testbed, eager: bool) -> None:
    start(bed, "mem256", memhog_bundle(bed.bundle_dir("mem256"), 256, seed=7, dirty_pps=0))
    rootfs = rootfs_of(bed, "mem256")
    before = wait_for(lambda: read_state(rootfs).get("status") == "ready" and read_state(rootfs),
                      timeout=60, what="memhog ready")
    code, report = migrate(bed, "mem256", "b", "--strategy", "stop-and-copy",
                           *(["--eager-restore"] if eager else []))
    assert code == 0, report
    assert report["image_bytes"] >= 256 << 20
    # the pages went straight to the destination's CRIU page server during the dump
    streamed = int(report["pages"].split()[0])
    assert 256 << 20 <= streamed <= report["image_bytes"], report["pages"]
    # and, unless eager, were copied into the restored process after it resumed
    filled = [p for p in report["phases"] if p["name"] == "pages"]
    assert bool(filled) is not eager, report["phases"]
    assert ("pages transferred" in report["pages"]) is not eager, report["pages"]
    dest = rootfs_of(bed, "mem256")
    assert bed.godwit("kill", "mem256", "--signal", "USR1").returncode == 0
    verified = wait_for(lambda: read_state(dest).get("status") == "verified" and read_state(dest),
                        timeout=60, what="memhog verification on b")
    assert verified["ok"] == 1
    assert verified["checksum"] == verified["expected"] == before["checksum"]
    assert verified["counter"] > before["counter"]
    remove(bed, "mem256")


CACHE = os.environ.get("GODWIT_CACHE", "/var/cache/godwit")  # a lab storage root
DEV_ADDITIONS = ("mkfifo /dev/pipe && ln -s null /dev/void && touch /dev/empty && "
                 "chmod 0640 /dev/empty && mkdir -m 0710 /dev/sub && "
                 "ln -s ../zero /dev/sub/zero && echo kept > /dev/shm/note")
DEV_LISTING = "stat -c '%n %f %u %g %t %T %Y %N' /dev/* /dev/sub/* /dev/shm/* /dev"


def dev_listing(bed: Testbed, name: str, host: str) -> list[str]:
    """Every entry of /dev and its tmpfs children, with type, mode, owner, device
    number, mtime and link target (not /dev/pts and /dev/mqueue: mounted afresh)."""
    listing = bed.godwit("exec", name, "--host", host, "--", "sh", "-c", DEV_LISTING)
    assert listing.returncode == 0, listing.stderr
    return [line for line in listing.stdout.splitlines()
            if line.split()[0] not in ("/dev/pts", "/dev/mqueue")]


def test_tmpfs_mounts_keep_their_content(bed: Testbed) -> None:
    """CRIU carries a tmpfs's files in the images: /dev (no file data) without tar since
    patch 0009, /dev/shm (a file) with tar. An empty read-only one (a masked path) is not
    dumped at all and must come back just as empty and read-only."""
    start(bed, "tmpfs", counter_bundle(bed.bundle_dir("tmpfs")))
    write = bed.godwit("exec", "tmpfs", "--", "sh", "-c", DEV_ADDITIONS)
    assert write.returncode == 0, write.stderr
    before = dev_listing(bed, "tmpfs", "a")
    assert len(before) > 15, before
    code, report = migrate(bed, "tmpfs", "b", "--strategy", "stop-and-copy")
    assert code == 0, report
    assert dev_listing(bed, "tmpfs", "b") == before
    note = bed.godwit("exec", "tmpfs", "--host", "b", "--", "cat", "/dev/shm/note")
    assert (note.returncode, note.stdout) == (0, "kept\n"), note.stderr
    masked = bed.godwit("exec", "tmpfs", "--host", "b", "--", "sh", "-c",
                        "grep ' /proc/acpi ' /proc/mounts; ls -A /proc/acpi")
    assert masked.returncode == 0, masked.stderr
    assert masked.stdout.split()[2:4] == ["tmpfs", "ro,relatime"], masked.stdout
    assert len(masked.stdout.splitlines()) == 1, f"/proc/acpi is not empty: {masked.stdout}"
    remove(bed, "tmpfs")


def test_shared_storage_moves_no_rootfs(bed: Testbed) -> None:
    start(bed, "shared", counter_bundle(bed.bundle_dir("shared")))
    rootfs = rootfs_of(bed, "shared")
    wait_for(lambda: (read_count(rootfs) or 0) >= 5, what="counter")
    code, report = migrate(bed, "shared", "b", "--shared-storage")
    assert code == 0, report
    assert report["rootfs_bytes"] == 0
    assert rootfs_of(bed, "shared") == rootfs
    before = read_count(rootfs)
    wait_for(lambda: (read_count(rootfs) or 0) > before + 3, what="counter on b")
    assert copies(bed, "shared") == [("b", "running")]
    remove(bed, "shared")


def images_arriving(staging: Path) -> bool:
    """The dump's images reach the destination (descriptors.json alone comes when armed,
    before the freeze)."""
    return any(p.name != "descriptors.json" for p in staging.glob("*/images/*"))


def staged(staging: Path, name: str) -> bool:
    """A staging area for `name` is still there (one may go while it is read)."""
    for request in staging.glob("*/request.json"):
        with contextlib.suppress(FileNotFoundError):
            if f'"{name}"' in request.read_text():
                return True
    return False


def test_destination_killed_mid_transfer_leaves_container_on_source(bed: Testbed) -> None:
    start(bed, "victim", memhog_bundle(bed.bundle_dir("victim"), 256, seed=3))
    rootfs = rootfs_of(bed, "victim")
    wait_for(lambda: read_state(rootfs).get("status") == "ready", timeout=60, what="memhog")
    env_cmd = [sys.executable, "-m", "godwit", "migrate", "victim", "--to", "b", "--json",
               "--strategy", "stop-and-copy", "--bandwidth", "40"]
    proc = subprocess.Popen(env_cmd, env={"GODWIT_CONFIG": str(bed.config_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = bed.host("b").state_dir / "incoming"
    wait_for(lambda: images_arriving(staging), timeout=30, what="images upload to start")
    bed.stop_agent("b", signal.SIGKILL)
    out, _err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    report = json.loads(out)
    assert report["result"] == "failed" and "resumed" in report["outcome"], report
    bed.start_agent("b")
    assert copies(bed, "victim") == [("a", "running")]
    logs = bed.host("b").state_dir / "runc-work" / "logs"
    assert not list(logs.glob("*")), "the held restore's runc log outlived its agent"
    counter = read_state(rootfs)["counter"]
    wait_for(lambda: read_state(rootfs)["counter"] > counter + 10, what="memhog to run on a")
    remove(bed, "victim")


def test_restore_failure_on_destination_resumes_source(bed: Testbed, tmp_path: Path) -> None:
    """A host-local volume missing on the destination makes runc restore fail there."""
    volume = tmp_path / "volume-only-on-a"
    volume.mkdir()
    bundle = counter_bundle(bed.bundle_dir("local-vol"))
    config = load_config(bundle)
    config["mounts"].append({"destination": "/data", "type": "bind", "source": str(volume),
                             "options": ["rbind", "rw"]})
    save_config(bundle, config)
    start(bed, "local-vol", bundle)
    rootfs = rootfs_of(bed, "local-vol")
    wait_for(lambda: (read_count(rootfs) or 0) >= 5, what="counter")
    volume.rmdir()  # the container keeps its mount; host b cannot bind it any more
    code, report = migrate(bed, "local-vol", "b")
    assert code != 0
    assert report["result"] == "failed" and "restore" in report["error"], report
    assert copies(bed, "local-vol") == [("a", "running")]
    before = read_count(rootfs)
    wait_for(lambda: (read_count(rootfs) or 0) > before + 3, what="counter resumed on a")
    remove(bed, "local-vol")


def lazy_pages_daemons(work: Path) -> list[int]:
    """Pids of the `criu lazy-pages` processes with work dir `work`."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if entry.name.isdigit() and "lazy-pages" in argv and str(work) in argv:
                found.append(int(entry.name))
    return found


def kill_fill_after_restore(state_dir: Path, stop: threading.Event) -> list[int]:
    """SIGKILL the destination's lazy-pages daemon once its restore finished, while it
    fills the memory; the pids killed."""
    killed: list[int] = []
    while not stop.is_set() and not killed:
        for log in state_dir.glob("incoming/*/work/restore.log"):
            if "Restore finished successfully" not in log.read_text(errors="replace"):
                continue
            for pid in lazy_pages_daemons(log.parent):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        time.sleep(0.002)
    return killed


def test_fill_after_restore_failing_resumes_source(bed: Testbed) -> None:
    """The destination's copy ran before all its memory was in: when the fill fails there,
    that copy is killed and the frozen source, complete, resumes."""
    start(bed, "fillfail", memhog_bundle(bed.bundle_dir("fillfail"), 1024, seed=3, dirty_pps=0))
    rootfs = rootfs_of(bed, "fillfail")
    before = wait_for(lambda: read_state(rootfs).get("status") == "ready" and read_state(rootfs),
                      timeout=60, what="memhog ready")
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_fill_after_restore, bed.host("b").state_dir, stop)
        code, report = migrate(bed, "fillfail", "b", "--strategy", "stop-and-copy")
        stop.set()
        assert killer.result(), "the fill ended before it could be killed"
    # Killed once CRIU's restore ended: the page transfer fails, or, when the kill comes
    # before godwit's restore step has seen the container run, that step does.
    assert code != 0 and ("page transfer failed" in report["error"]
                          or "criu lazy-pages: exit -9" in report["error"]), report
    assert copies(bed, "fillfail") == [("a", "running")]
    assert bed.godwit("kill", "fillfail", "--signal", "USR1").returncode == 0
    verified = wait_for(lambda: read_state(rootfs).get("status") == "verified"
                        and read_state(rootfs), timeout=60, what="memhog verification on a")
    assert verified["ok"] == 1 and verified["checksum"] == before["checksum"]
    remove(bed, "fillfail")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["migrate", "nosuch", "--to", "b"], "not found"),
        (["migrate", "x", "--to", "b", "--strategy", "warp"], "Invalid value"),
        (["run", "bad", "--bundle", f"{CACHE}/nonexistent/bundle", "--host", "a"],
         "not a directory"),  # inside the lab's storage roots: the store's checks, not the policy
        (["run", "bad", "--bundle", CACHE, "--host", "a"], "no config.json"),
        (["run", "../evil", "--bundle", "/tmp", "--host", "a"], "invalid container name"),
        (["run", "bad", "--bundle", "/tmp", "--host", "a"], "outside the storage roots"),
        (["ps", "--host", "127.0.0.1:1"], "cannot connect"),
        (["exec", "nosuch", "true"], "not found"),
        (["hosts", "rm", "nosuch"], "no host"),
    ],
)
def test_bad_input_gives_one_line_error(bed: Testbed, args: list[str], message: str) -> None:
    result = bed.godwit(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


def test_migrate_to_unreachable_host_touches_nothing(bed: Testbed) -> None:
    start(bed, "stay", counter_bundle(bed.bundle_dir("stay")))
    result = bed.godwit("migrate", "stay", "--to", "127.0.0.1:1")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "cannot connect" in result.stderr
    assert copies(bed, "stay") == [("a", "running")]
    remove(bed, "stay")


def test_history_and_report(bed: Testbed, tmp_path: Path) -> None:
    start(bed, "hist", counter_bundle(bed.bundle_dir("hist")))
    code, done = migrate(bed, "hist", "b")
    assert code == 0
    reports = cli_json(bed, "history")
    assert done["id"] in {r["id"] for r in reports}
    listing = bed.godwit("history")
    assert done["id"][:8] in listing.stdout and "hist" in listing.stdout
    png = tmp_path / "timeline.png"
    result = bed.godwit("report", done["id"][:8], "--png", str(png))
    assert result.returncode == 0, result.stderr
    assert "downtime" in result.stdout and "restore" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert cli_json(bed, "report", done["id"])["downtime_s"] == done["downtime_s"]
    unknown = bed.godwit("report", "ffffffff")
    assert unknown.returncode != 0 and "no migrations match" in unknown.stderr
    remove(bed, "hist")


def test_resume_brings_back_a_paused_copy(bed: Testbed) -> None:
    """What an operator does after a migration ended in doubt (source left paused)."""
    start(bed, "held", counter_bundle(bed.bundle_dir("held")))
    rootfs = rootfs_of(bed, "held")
    wait_for(lambda: read_count(rootfs), what="counter")
    runc = [DEFAULT_RUNC, "--root", str(bed.host("a").runc_root)]
    subprocess.run([*runc, "pause", "held"], check=True)
    assert copies(bed, "held") == [("a", "paused")]
    frozen = read_count(rootfs)
    result = bed.godwit("resume", "held")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: (read_count(rootfs) or 0) > frozen + 3, what="counter after resume")
    again = bed.godwit("resume", "held")
    assert again.returncode != 0 and "not paused" in again.stderr
    remove(bed, "held")


def test_source_agent_killed_mid_transfer_resumes_on_restart(bed: Testbed) -> None:
    """The container is frozen when its agent dies; the restarted agent settles it."""
    start(bed, "orphan", memhog_bundle(bed.bundle_dir("orphan"), 256, seed=5))
    rootfs = rootfs_of(bed, "orphan")
    wait_for(lambda: read_state(rootfs).get("status") == "ready", timeout=60, what="memhog")
    proc = subprocess.Popen(
        [sys.executable, "-m", "godwit", "migrate", "orphan", "--to", "b", "--json",
         "--strategy", "stop-and-copy", "--bandwidth", "40"],
        env={"GODWIT_CONFIG": str(bed.config_path)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    staging = bed.host("b").state_dir / "incoming"
    wait_for(lambda: images_arriving(staging), timeout=30, what="images upload")
    bed.stop_agent("a", signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    counter = read_state(rootfs)["counter"]
    time.sleep(0.5)
    assert read_state(rootfs)["counter"] == counter, "the source copy should be frozen"
    bed.start_agent("a")
    wait_for(lambda: copies(bed, "orphan") == [("a", "running")], timeout=30,
             what="the restarted agent to resume the container")
    wait_for(lambda: read_state(rootfs)["counter"] > counter + 10, what="memhog running")
    wait_for(lambda: not staged(staging, "orphan"), timeout=30,
             what="the destination's staging area to be dropped")
    recovered = wait_for(lambda: [r for r in cli_json(bed, "history")
                                  if r["container"] == "orphan"],
                         timeout=30, what="the recovered migration's report")
    assert "restarted" in recovered[-1]["error"]
    remove(bed, "orphan")
