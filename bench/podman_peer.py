"""Podman as a peer of bench/migrate.py: the same memhog workload, the same CRIU and runc,
migrated with Podman's own checkpoint archive.

    podman container checkpoint --export=a/ck.tar --compress=none NAME    (stops it)
    copy the archive to b's directory
    podman container restore --import=b/ck.tar --name NAME-b

Podman keeps one container store per machine, so both "hosts" are this machine's Podman
and the restore runs on the same store (as `restore --import` on another host would after
the copy). The copy is either a local ``cp`` (the archive never crosses a network) or a
plain TCP stream from host a's netns to host b's over the testbed link (no TLS, where
godwit's transfers are mutual TLS: both favour Podman). Downtime = total = from the start
of the checkpoint to the end of the restore.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from godwit.lab.bundles import make_busybox_rootfs
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import build_memhog

PODMAN = "podman"
PODMAN_TIMEOUT_S = 300
COPY_PORT = 7461
# Podman sets nproc and nofile limits of its own; root here lacks CAP_SYS_RESOURCE to
# raise them, so they are given at or below the host's.
RUN_OPTIONS = ["--runtime", "runc", "--network", "none",
               "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]

RECEIVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, _ = server.accept()
with open(sys.argv[3], "wb") as out:
    while chunk := conn.recv(1 << 20):
        out.write(chunk)
"""
SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as conn:
    with open(sys.argv[3], "rb") as archive:
        conn.sendfile(archive)
"""


class PodmanError(RuntimeError):
    """A Podman step failed."""


def available() -> bool:
    return shutil.which(PODMAN) is not None


def podman(*args: str) -> str:
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True,
                            timeout=PODMAN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise PodmanError(f"podman {args[0]} {args[1] if len(args) > 1 else ''}: "
                          f"{result.stderr.strip()[-500:]}")
    return result.stdout.strip()


def memhog_image() -> str:
    """A local image holding busybox and memhog, imported once per memhog build."""
    memhog = build_memhog()
    tag = f"localhost/godwit-bench-memhog:{hashlib.sha256(memhog.read_bytes()).hexdigest()[:12]}"
    if podman("images", "-q", tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="godwit-podman-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        make_busybox_rootfs(rootfs)
        shutil.copy2(memhog, rootfs / "bin/memhog")
        tar = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        podman("import", "-q", str(tar), tag)
    return tag


def start(image: str, name: str, mib: int) -> Path:
    """Run memhog under Podman (dirty_pps=0, as in the godwit runs); its rootfs as seen
    from the host, where memhog writes /state. A container of that name left by an
    interrupted run goes first."""
    subprocess.run([PODMAN, "rm", "-f", "-t", "0", name], capture_output=True, check=False)
    podman("run", "-d", "--name", name, *RUN_OPTIONS, image,
           "memhog", str(mib), "1", "/state", "0")
    return merged_dir(name)


def merged_dir(name: str) -> Path:
    return Path(podman("inspect", "-f", "{{.GraphDriver.Data.MergedDir}}", name))


def copy_over_link(bed: Testbed, source: Path, dest: Path) -> None:
    """Stream ``source`` from host a's netns to ``dest`` in host b's over plain TCP."""
    address = bed.host("b").address
    receiver = bed.net.run_in("b", [sys.executable, "-c", RECEIVER, address, str(COPY_PORT),
                                    str(dest)], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    try:
        if receiver.stdout.readline().strip() != b"listening":
            raise PodmanError("archive receiver on b did not start")
        sender = bed.net.run_in("a", [sys.executable, "-c", SENDER, address, str(COPY_PORT),
                                      str(source)], stdin=subprocess.DEVNULL)
        if sender.wait(PODMAN_TIMEOUT_S) != 0 or receiver.wait(PODMAN_TIMEOUT_S) != 0:
            raise PodmanError("copying the archive over the testbed link failed")
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def migrate(bed: Testbed, name: str, over_link: bool) -> tuple[str, dict[str, float]]:
    """Checkpoint, copy, restore under a new name; (new name, seconds of each step)."""
    src = bed.host("a").state_dir / "podman" / name
    dst = bed.host("b").state_dir / "podman" / name
    src.mkdir(parents=True, exist_ok=True)
    dst.mkdir(parents=True, exist_ok=True)
    restored = f"{name}-b"
    t0 = time.perf_counter()
    podman("container", "checkpoint", f"--export={src / 'ck.tar'}", "--compress=none", name)
    t1 = time.perf_counter()
    if over_link:
        copy_over_link(bed, src / "ck.tar", dst / "ck.tar")
    else:
        shutil.copyfile(src / "ck.tar", dst / "ck.tar")
    t2 = time.perf_counter()
    podman("container", "restore", f"--import={dst / 'ck.tar'}", "--name", restored)
    t3 = time.perf_counter()
    return restored, {"checkpoint": t1 - t0, "copy": t2 - t1, "restore": t3 - t2}


def archive_bytes(bed: Testbed, name: str) -> int:
    return (bed.host("b").state_dir / "podman" / name / "ck.tar").stat().st_size


def remove(bed: Testbed, name: str) -> None:
    subprocess.run([PODMAN, "rm", "-f", "-t", "0", name, f"{name}-b"], capture_output=True,
                   timeout=PODMAN_TIMEOUT_S)
    for host in ("a", "b"):
        shutil.rmtree(bed.host(host).state_dir / "podman" / name, ignore_errors=True)


def result(steps: dict[str, float], archive: int) -> dict[str, Any]:
    total = sum(steps.values())
    return {"downtime_s": total, "total_s": total, "image_bytes": archive,
            "rootfs_bytes": 0, "wire_bytes": archive, "phases": steps}
