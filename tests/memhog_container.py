"""memhog run as a container of a testbed host: started, migrated in the background, and
asked to checksum all its memory again where it runs now; or run by runc alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import cli_json, copies, wait_for
from faultmatrix import faulty_agent

from godwit.lab.testbed import Testbed
from godwit.lab.workloads import memhog_bundle, read_state
from godwit.runc import Runc


def start_memhog(bed: Testbed, name: str, mib: int, protected_mib: int = 0,
                 hole_mib: int = 0) -> tuple[Path, dict]:
    bundle = memhog_bundle(bed.bundle_dir(name), mib, seed=11, dirty_pps=0,
                           protected_mib=protected_mib, hole_mib=hole_mib)
    result = bed.godwit("run", name, "--bundle", str(bundle), "--host", "a")
    assert result.returncode == 0, result.stderr
    rootfs = bundle / "rootfs"
    state = wait_for(lambda: read_state(rootfs).get("status") == "ready" and read_state(rootfs),
                     timeout=120, what="memhog ready")
    return rootfs, state


def verify(bed: Testbed, name: str, rootfs: Path) -> dict:
    """Ask memhog to checksum all its memory again (SIGUSR1) and return its verdict."""
    assert bed.godwit("kill", name, "--signal", "USR1").returncode == 0
    return wait_for(lambda: read_state(rootfs).get("status") == "verified" and read_state(rootfs),
                    timeout=120, what=f"{name} verification")


def rootfs_on(bed: Testbed, name: str) -> Path:
    rows = cli_json(bed, "ps")["containers"]
    return Path(next(r["rootfs"] for r in rows if r["name"] == name))


def migrate_in_background(bed: Testbed, name: str, strategy: str) -> subprocess.Popen:
    """`godwit migrate NAME --to b --json`, left running: its report is on stdout."""
    env = {"GODWIT_CONFIG": str(bed.config_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-m", "godwit", "migrate", name, "--to", "b", "--strategy", strategy,
         "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report_of(migration: subprocess.Popen, timeout: float) -> dict:
    out, _ = migration.communicate(timeout=timeout)
    return json.loads(out or "{}")


def failed_post_copy(bed: Testbed, name: str, fault: str) -> None:
    """A memhog container whose post-copy to b fails at b's `fault`: it runs on a."""
    start_memhog(bed, name, 64)
    with faulty_agent(bed, "b", fault):
        result = bed.godwit("migrate", name, "--to", "b", "--strategy", "post-copy", "--json")
    report = json.loads(result.stdout)
    assert result.returncode != 0 and report["result"] == "failed", report
    assert copies(bed, name) == [("a", "running")]


@contextlib.contextmanager
def running_in_runc(runc: Runc, name: str, bundle: Path) -> Iterator[Path]:
    """A memhog `bundle` run detached by `runc` alone (no agent), yielded once ready as its
    rootfs; force-deleted at exit."""
    asyncio.run(runc.run_detached(name, bundle))
    try:
        wait_for(lambda: read_state(bundle / "rootfs").get("status") == "ready", what="memhog")
        yield bundle / "rootfs"
    finally:
        subprocess.run([runc.binary, "--root", str(runc.root), "delete", "--force", name],
                       capture_output=True, check=False)
