"""Post-copy (lazy pages over a mutual-TLS CRIU page server) and strategy selection."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import cli_json, copies, wait_for
from memhog_container import migrate_in_background, report_of, rootfs_on, start_memhog, verify

from godwit.lab.testbed import Testbed
from godwit.lab.workloads import memhog_bundle, read_state

pytestmark = pytest.mark.integration


def test_post_copy_moves_1_gib_with_every_byte(bed: Testbed) -> None:
    _, before = start_memhog(bed, "lazy1g", 1024)
    result = bed.godwit("migrate", "lazy1g", "--to", "b", "--strategy", "auto", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["result"] == "ok", report
    assert report["strategy"] == "post-copy", "auto should pick post-copy for 1 GiB here"
    assert report["image_bytes"] < 16 << 20, "memory must not travel as image files"
    assert "pages" in {p["name"] for p in report["phases"]}
    verified = verify(bed, "lazy1g", rootfs_on(bed, "lazy1g"))
    assert verified["ok"] == 1 and verified["checksum"] == before["checksum"]
    assert verified["counter"] > before["counter"]
    assert copies(bed, "lazy1g") == [("b", "running")]
    bed.godwit("rm", "lazy1g")


RESTORED = "Restore finished successfully"  # CRIU's restore log, tasks resumed


# memhog in the background, and a shell holding 32 MiB that starts and ends a task every
# 50 ms: each one shares the shell's memory, still arriving when it exits.
SHORT_LIVED_TASKS = ("trap 'exit 0' TERM INT; memhog 384 5 /state 0 & "
                     "x=$(dd if=/dev/zero bs=1M count=32 2>/dev/null | tr '\\0' a); "
                     "while :; do sleep 0.05; done")


def test_a_task_that_exits_during_the_page_transfer_does_not_fail_it(bed: Testbed) -> None:
    bundle = memhog_bundle(bed.bundle_dir("churn"), 384, seed=5, dirty_pps=0)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = ["/bin/sh", "-c", SHORT_LIVED_TASKS]
    (bundle / "config.json").write_text(json.dumps(config))
    assert bed.godwit("run", "churn", "--bundle", str(bundle), "--host", "a").returncode == 0
    before = wait_for(lambda: read_state(bundle / "rootfs").get("status") == "ready"
                      and read_state(bundle / "rootfs"), timeout=120, what="memhog ready")
    report = cli_json(bed, "migrate", "churn", "--to", "b", "--strategy", "post-copy")
    assert report["result"] == "ok", report
    assert "exited meanwhile" in report["pages"], f"no task ended during the transfer: {report}"
    memhog = bed.godwit("exec", "churn", "--", "pidof", "memhog").stdout.strip()
    assert bed.godwit("exec", "churn", "--", "kill", "-USR1", memhog).returncode == 0
    rootfs = rootfs_on(bed, "churn")
    verified = wait_for(lambda: read_state(rootfs).get("status") == "verified"
                        and read_state(rootfs), timeout=120, what="memhog verification")
    assert verified["ok"] == 1 and verified["checksum"] == before["checksum"]
    bed.godwit("rm", "churn")


def test_post_copy_carries_memory_the_process_cannot_read_now(any_bed: Testbed) -> None:
    """Pages of a PROT_NONE mapping are lazy pages too; the source must still serve them."""
    bed = any_bed
    _, before = start_memhog(bed, "noread", 256, protected_mib=32)
    report = cli_json(bed, "migrate", "noread", "--to", "b", "--strategy", "post-copy")
    assert report["result"] == "ok", report
    verified = verify(bed, "noread", rootfs_on(bed, "noread"))
    assert verified["ok"] == 1 and verified["checksum"] == before["checksum"]
    bed.godwit("rm", "noread")


def resident_mib(bed: Testbed, name: str) -> float:
    """Resident memory of the container's init process, wherever it runs now."""
    pid = next(r["pid"] for r in cli_json(bed, "ps")["containers"] if r["name"] == name)
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return next(int(line.split()[1]) for line in rollup if line.startswith("Rss:")) / 1024


def test_post_copy_leaves_given_back_memory_unallocated(bed: Testbed) -> None:
    """96 MiB in the middle of memhog's area were given back (MADV_DONTNEED): not lazy
    pages, so the destination must not turn them into memory. (A lazy dump scans only
    the ends of a big area when Rss shows its middle has no hole: CRIU patch 0008.)"""
    _, before = start_memhog(bed, "holey", 256, hole_mib=96)
    assert resident_mib(bed, "holey") < 192, "the hole should use no memory on the source"
    report = cli_json(bed, "migrate", "holey", "--to", "b", "--strategy", "post-copy")
    assert report["result"] == "ok", report
    verified = verify(bed, "holey", rootfs_on(bed, "holey"))
    assert verified["ok"] == 1 and verified["checksum"] == before["checksum"]
    assert resident_mib(bed, "holey") < 192, "the hole was filled on the destination"
    bed.godwit("rm", "holey")


def test_auto_keeps_stop_and_copy_for_small_containers(bed: Testbed) -> None:
    start_memhog(bed, "small", 4)
    report = cli_json(bed, "migrate", "small", "--to", "b")
    assert report["strategy"] == "stop-and-copy"
    bed.godwit("rm", "small")


def test_auto_takes_post_copy_from_a_few_dozen_mib(bed: Testbed) -> None:
    start_memhog(bed, "medium", 48)
    report = cli_json(bed, "migrate", "medium", "--to", "b")
    assert report["strategy"] == "post-copy"
    bed.godwit("rm", "medium")


def kill_lazy_daemon_mid_transfer(bed: Testbed) -> None:
    """SIGKILL b's lazy-pages daemon as soon as the restore is done: the fill is under way
    (1 GiB takes about a second), whatever the machine's speed."""
    staging = bed.host("b").state_dir / "incoming"
    wait_for(lambda: any(RESTORED in log.read_text(errors="replace")
                         for log in staging.glob("*/work/restore.log")),
             timeout=60, what="the post-copy restore to finish")
    subprocess.run(["pkill", "-KILL", "-f", f"lazy-pages.*{bed.host('b').state_dir}"],
                   check=True)


def test_broken_page_transfer_resumes_the_source(bed: Testbed) -> None:
    rootfs, before = start_memhog(bed, "cut", 1024)
    migrate = migrate_in_background(bed, "cut", "post-copy")
    kill_lazy_daemon_mid_transfer(bed)
    report = report_of(migrate, timeout=300)
    assert migrate.returncode != 0 and report["result"] == "failed", report
    assert "post-copy page transfer failed" in report["error"]
    assert copies(bed, "cut") == [("a", "running")], "the incomplete copy must be gone"
    verified = verify(bed, "cut", rootfs)
    assert verified["ok"] == 1 and verified["checksum"] == before["checksum"]
    bed.godwit("rm", "cut")


def test_pre_copy_runs_where_the_kernel_tracks_dirty_memory(bed: Testbed) -> None:
    """Here (no soft-dirty) a clear refusal; on a kernel with it, a verified migration."""
    _, before = start_memhog(bed, "pre", 64)
    soft_dirty = cli_json(bed, "hosts")["a"]["criu"]["soft_dirty"]
    result = bed.godwit("migrate", "pre", "--to", "b", "--strategy", "pre-copy")
    assert "Traceback" not in result.stderr
    if not soft_dirty:
        assert result.returncode != 0 and "soft-dirty" in result.stderr
        assert copies(bed, "pre") == [("a", "running")]
    else:
        assert result.returncode == 0, result.stderr
        verified = verify(bed, "pre", rootfs_on(bed, "pre"))
        assert verified["ok"] == 1 and verified["checksum"] == before["checksum"]
    bed.godwit("rm", "pre")
