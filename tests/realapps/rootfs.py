"""The real-applications rootfs: Debian bookworm (debootstrap, variant minbase) with
redis-server, nginx and PostgreSQL 15, and a PostgreSQL data directory made by initdb.

Built once into ``${GODWIT_CACHE:-/var/cache/godwit}/rootfs/realapps-<key>``, where the key
is a hash of the recipe below: a second run finds it in a moment. Build it ahead with
``python3 tests/realapps/rootfs.py`` (as root); the tests call :func:`cached_rootfs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ["redis-server", "nginx", "postgresql-15"]
PG_BIN = "/usr/lib/postgresql/15/bin"
PG_DATA = "/var/lib/postgresql/data"
PG_HBA_EXTRA = "host all all 0.0.0.0/0 trust\n"
# Explicit, so that nothing depends on what initdb probed in the chroot (it picks sysv
# there; on a running system, with /dev/shm a tmpfs, Debian's cluster gets posix).
PG_CONF_EXTRA = """
listen_addresses = '*'
unix_socket_directories = ''
dynamic_shared_memory_type = posix
"""
# Strip what no server reads, to keep the per-test copies and the rootfs transfers small.
PRUNE = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
         "var/cache/apt", "var/lib/apt/lists", "var/cache/debconf/templates.dat-old"]
RECIPE = {"suite": SUITE, "mirror": MIRROR, "variant": "minbase", "packages": PACKAGES,
          "pg_data": PG_DATA, "pg_hba_extra": PG_HBA_EXTRA, "pg_conf_extra": PG_CONF_EXTRA,
          "prune": PRUNE}


def cache_dir() -> Path:
    """The cache scripts/setup uses."""
    return Path(os.environ.get("GODWIT_CACHE", "/var/cache/godwit"))


def recipe_key() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def cached_rootfs() -> Path:
    """The rootfs for this recipe, built first if the cache lacks it (minutes, once)."""
    target = cache_dir() / "rootfs" / f"realapps-{recipe_key()}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / ".realapps.lock"):
        if not target.is_dir():  # another run may have built it while we waited
            _build(target)
            _drop_other_versions(target)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(target: Path) -> None:
    """debootstrap into a scratch dir, set it up, then rename it into place."""
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap missing: run scripts/setup first")
    scratch = target.with_name(target.name + ".partial")
    _check_nothing_mounted(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"building {target} (debootstrap {SUITE}: a few minutes, once)", file=sys.stderr)
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
          str(scratch), MIRROR])
    _init_postgres(scratch)
    for rel in PRUNE:
        shutil.rmtree(scratch / rel, ignore_errors=True)
    (scratch / "etc/hostname").write_text("realapps\n")
    scratch.rename(target)


def _check_nothing_mounted(directory: Path) -> None:
    """A crashed debootstrap may leave /proc or /dev mounted in its target: never rmtree that."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    inside = [m for m in mounts if m == str(directory) or m.startswith(f"{directory}/")]
    if inside:
        raise RuntimeError(f"unmount {', '.join(inside)} first (left by a failed build)")


def _init_postgres(rootfs: Path) -> None:
    """Our own cluster (trust auth, reachable over TCP), not the packaged "main" one."""
    _chroot(rootfs, ["pg_dropcluster", "15", "main"], check=False)
    data = rootfs / PG_DATA.lstrip("/")
    data.mkdir(parents=True)
    _chroot(rootfs, ["chown", "postgres:postgres", PG_DATA])
    _chroot(rootfs, ["chroot", "--userspec=postgres:postgres", "/", f"{PG_BIN}/initdb",
                     "-D", PG_DATA, "--auth=trust", "--locale=C.UTF-8", "--encoding=UTF8"])
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write(PG_HBA_EXTRA)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(PG_CONF_EXTRA)


def _chroot(rootfs: Path, argv: list[str], check: bool = True) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    _run(["chroot", str(rootfs), *argv], env=env, check=check)


def _run(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(argv[:3])} … failed:\n" + "\n".join(tail))


def _drop_other_versions(keep: Path) -> None:
    for old in keep.parent.glob("realapps-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    print(cached_rootfs())
