"""Test bundles: a static-busybox rootfs, and a bundle that counts in memory.

Used by the demo, the test workloads, the integration tests and the benchmarks.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from godwit.bundle import oci_config, save_config

BUSYBOX = Path("/usr/bin/busybox")
ROOTFS_DIRS = ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root"]
ROOTFS_DIRS += ["var", "run"]

# PID 1 of a pid namespace ignores signals it has no handler for: trap TERM to stop cleanly.
COUNTER_SCRIPT = (
    "trap 'exit 0' TERM INT; i=0; "
    "while :; do i=$((i+1)); echo $i > /count.tmp; mv /count.tmp /count; sleep 0.1; done"
)


def make_busybox_rootfs(rootfs: Path, hostname: str = "godwit") -> None:
    """Populate ``rootfs`` with the base dirs, static busybox + applet symlinks and /etc."""
    for d in ROOTFS_DIRS:
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in applets:
        link = rootfs / rel
        if rel != "bin/busybox" and not link.is_symlink() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    etc = rootfs / "etc"
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "hostname").write_text(f"{hostname}\n")


def write_bundle(bundle_dir: Path, args: list[str], **kw: Any) -> Path:
    """Create ``bundle_dir`` with a busybox rootfs and config.json (``kw`` → :func:`oci_config`)."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    config = oci_config(args, **kw)
    make_busybox_rootfs(bundle_dir / "rootfs", hostname=config["hostname"])
    save_config(bundle_dir, config)
    return bundle_dir


def counter_bundle(bundle_dir: Path, **kw: Any) -> Path:
    """Bundle whose shell increments an in-memory counter every 100 ms into ``/count``."""
    return write_bundle(bundle_dir, ["/bin/sh", "-c", COUNTER_SCRIPT], **kw)


def read_count(rootfs: Path) -> int | None:
    """The counter bundle's current value, or None before its first write."""
    try:
        return int((Path(rootfs) / "count").read_text())
    except (FileNotFoundError, ValueError):
        return None
