"""Test workloads: memhog (touched memory with a verifiable checksum, see memhog.c)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from godwit.bundle import write_bundle

MEMHOG_SOURCE = Path(__file__).with_name("memhog.c")
DEFAULT_CACHE = Path("/var/cache/godwit/workloads")
CFLAGS = ["-O2", "-static", "-Wall", "-Wextra"]


def build_memhog(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Compile memhog.c statically into ``cache_dir`` (once per source/flags hash)."""
    digest = hashlib.sha256(MEMHOG_SOURCE.read_bytes() + " ".join(CFLAGS).encode())
    binary = Path(cache_dir) / f"memhog-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=binary.parent, prefix=".memhog-")
    os.close(fd)
    try:
        subprocess.run(
            ["gcc", *CFLAGS, "-o", tmp, str(MEMHOG_SOURCE)],
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
    cache_dir: Path = DEFAULT_CACHE,
    **kw: Any,
) -> Path:
    """Busybox bundle running ``memhog MIB SEED /state [DIRTY_PPS]`` (``kw`` → oci_config)."""
    args = ["memhog", str(mib), str(seed), "/state"]
    if dirty_pps is not None:
        args.append(str(dirty_pps))
    bundle_dir = write_bundle(bundle_dir, args, **kw)
    shutil.copy2(build_memhog(cache_dir), bundle_dir / "rootfs/bin/memhog")
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
