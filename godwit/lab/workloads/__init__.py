"""Test workloads: memhog (touched memory with a verifiable checksum, see memhog.c) and
netserver (TCP/UDP counter server, see netserver.c), compiled statically for busybox."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from godwit.lab.bundles import write_bundle

MEMHOG_SOURCE = Path(__file__).with_name("memhog.c")
NETSERVER_SOURCE = Path(__file__).with_name("netserver.c")
DEFAULT_CACHE = Path("/var/cache/godwit/workloads")
CFLAGS = ["-O2", "-static", "-Wall", "-Wextra"]


def build_memhog(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Compile memhog.c statically into ``cache_dir`` (once per source/flags hash)."""
    return build_static(MEMHOG_SOURCE, cache_dir)


def build_netserver(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Compile netserver.c statically into ``cache_dir`` (once per source/flags hash)."""
    return build_static(NETSERVER_SOURCE, cache_dir)


def build_static(source: Path, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """``gcc -static`` ``source`` into ``cache_dir/<stem>-<hash>``, atomically."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS).encode())
    binary = Path(cache_dir) / f"{source.stem}-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=binary.parent, prefix=f".{source.stem}-")
    os.close(fd)
    try:
        subprocess.run(
            ["gcc", *CFLAGS, "-o", tmp, str(source)],
            check=True,
            capture_output=True,
            text=True,
        )
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)  # atomic: concurrent builders are fine
    finally:
        Path(tmp).unlink(missing_ok=True)
    return binary


def memhog_bundle(
    bundle_dir: Path,
    mib: int,
    seed: int = 1,
    *,
    dirty_pps: int | None = None,
    protected_mib: int = 0,
    hole_mib: int = 0,
    cache_dir: Path = DEFAULT_CACHE,
    **kw: Any,
) -> Path:
    """Busybox bundle running ``memhog MIB SEED /state [DIRTY_PPS [PROTECTED_MIB
    [HOLE_MIB]]]`` (``kw`` → oci_config)."""
    args = ["memhog", str(mib), str(seed), "/state"]
    if dirty_pps is not None or protected_mib or hole_mib:
        args.append(str(10 if dirty_pps is None else dirty_pps))
    if protected_mib or hole_mib:
        args.append(str(protected_mib))
    if hole_mib:
        args.append(str(hole_mib))
    bundle_dir = write_bundle(bundle_dir, args, **kw)
    shutil.copy2(build_memhog(cache_dir), bundle_dir / "rootfs/bin/memhog")
    return bundle_dir


def netserver_bundle(
    bundle_dir: Path, port: int = 7000, *, cache_dir: Path = DEFAULT_CACHE, **kw: Any
) -> Path:
    """Busybox bundle running ``netserver PORT`` (TCP and UDP on 0.0.0.0:PORT).

    ``kw`` → oci_config; pass ``network_ns_path`` to run it in a godwit container netns.
    """
    bundle_dir = write_bundle(bundle_dir, ["netserver", str(port)], **kw)
    shutil.copy2(build_netserver(cache_dir), bundle_dir / "rootfs/bin/netserver")
    return bundle_dir


def read_state(rootfs: Path) -> dict[str, Any]:
    """Parse memhog's ``/state`` into ``{"status": ..., "mib": int, ...}``; {} if absent."""
    try:
        words = (Path(rootfs) / "state").read_text().split()
    except FileNotFoundError:
        return {}
    if not words:
        return {}
    state: dict[str, Any] = {"status": words[0]}
    for word in words[1:]:
        key, _, value = word.partition("=")
        state[key] = int(value) if value.isdigit() else value
    return state
