"""Test images without any registry: the busybox rootfs plus the static netserver, packed
with umoci as an OCI image layout of two layers (the second whites out a file the first
added) and converted by skopeo into a docker-archive.

Built once into ``${GODWIT_CACHE:-/var/cache/godwit}/images/netserver-<key>/`` (``oci/``
and ``netserver.tar``), where the key hashes the recipe, busybox and netserver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from godwit.lab.bundles import BUSYBOX, make_busybox_rootfs
from godwit.lab.workloads import build_netserver

TAG = "netserver"
WHITED_OUT = "etc/build-secret"  # added by layer 1, deleted by layer 2
SERVER_USER = ("srv", 1000, 1000)
EXTRA_GROUP = ("net", 1001)  # lists srv as a member
CONFIG = {  # `umoci config` options of the image
    "--config.entrypoint": ["/bin/netserver"],
    "--config.cmd": ["7000"],
    "--config.user": ["srv"],
    "--config.env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin", "GREETING=hello"],
    "--config.workingdir": ["/srv"],
    "--config.exposedports": ["7000/tcp", "7000/udp"],
}


@dataclass(frozen=True)
class TestImage:
    """The same image as an OCI layout (tag TAG) and as a docker-archive."""

    __test__ = False  # not a pytest test class

    layout: Path
    archive: Path

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{TAG}"

    @property
    def archive_ref(self) -> str:
        return f"docker-archive:{self.archive}"


def cache_root() -> Path:
    return Path(os.environ.get("GODWIT_CACHE", "/var/cache/godwit")) / "images"


def netserver_image(root: Path | None = None) -> TestImage:
    """The cached test image, built first when missing."""
    root = root or cache_root()
    netserver = build_netserver()
    key = hashlib.sha256(json.dumps(CONFIG).encode() + BUSYBOX.read_bytes()
                         + netserver.read_bytes() + WHITED_OUT.encode()).hexdigest()[:16]
    final = root / f"netserver-{key}"
    if not (final / "netserver.tar").exists():
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        try:
            _build(work, netserver)
            with contextlib.suppress(OSError):  # another process built it meanwhile
                work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return TestImage(final / "oci", final / "netserver.tar")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _build(work: Path, netserver: Path) -> None:
    layout, bundle = work / "oci", work / "bundle"
    image = f"{layout}:{TAG}"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    _run("umoci", "unpack", "--image", image, str(bundle))
    _populate(bundle / "rootfs", netserver)
    _run("umoci", "repack", "--image", image, str(bundle))
    _run("umoci", "insert", "--image", image, "--whiteout", f"/{WHITED_OUT}")
    options = [arg for option, values in CONFIG.items() for v in values for arg in (option, v)]
    _run("umoci", "config", "--image", image, *options)
    _run("umoci", "gc", "--layout", str(layout))
    shutil.rmtree(bundle)
    _run("skopeo", "copy", "--quiet", f"oci:{image}",
         f"docker-archive:{work / 'netserver.tar'}:godwit/{TAG}:latest")


def _populate(rootfs: Path, netserver: Path) -> None:
    """Layer 1: busybox, netserver, a server user with a home and an extra group, and the
    file layer 2 deletes."""
    make_busybox_rootfs(rootfs, hostname=TAG)
    shutil.copy2(netserver, rootfs / "bin/netserver")
    name, uid, gid = SERVER_USER
    group, extra_gid = EXTRA_GROUP
    with open(rootfs / "etc/passwd", "a") as passwd:
        passwd.write(f"{name}:x:{uid}:{gid}:server:/home/{name}:/bin/sh\n")
    with open(rootfs / "etc/group", "a") as groups:
        groups.write(f"{name}:x:{gid}:\n{group}:x:{extra_gid}:{name}\n")
    for directory in (rootfs / "srv", rootfs / "home" / name):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, uid, gid)
    (rootfs / WHITED_OUT).write_text("deleted by the image's second layer\n")
