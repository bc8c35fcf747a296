"""OCI bundles for runc: config.json generation/rewrite and a static-busybox rootfs."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BUSYBOX = Path("/usr/bin/busybox")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Same as `runc spec` (runc 1.1).
DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
ROOTFS_DIRS = ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root"]
ROOTFS_DIRS += ["var", "run"]

# PID 1 of a pid namespace ignores signals it has no handler for: trap TERM to stop cleanly.
COUNTER_SCRIPT = (
    "trap 'exit 0' TERM INT; i=0; "
    "while :; do i=$((i+1)); echo $i > /count.tmp; mv /count.tmp /count; sleep 0.1; done"
)


def _mount(dest: str, typ: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": dest, "type": typ, "source": source, "options": options}


def _mounts() -> list[dict[str, Any]]:
    """runc spec's mounts minus the read-only cgroup mount (keeps CRIU's job simple)."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        _mount(
            "/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
        ),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
    ]


def _env_list(env: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    merged = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if isinstance(env, Mapping):
        merged.update(env)
    elif env is not None:
        merged.update(item.split("=", 1) for item in env)
    return [f"{k}={v}" for k, v in merged.items()]


def oci_config(
    args: list[str],
    *,
    env: Mapping[str, str] | Sequence[str] | None = None,
    cwd: str = "/",
    hostname: str | None = None,
    readonly: bool = False,
    cgroups_path: str | None = None,
    network_ns_path: str | None = None,
    uid: int = 0,
    gid: int = 0,
    additional_gids: Sequence[int] = (),
    capabilities: Sequence[str] = tuple(DEFAULT_CAPS),
) -> dict[str, Any]:
    """A complete runc-1.1 config.json: no terminal, rootfs ``rootfs`` (writable by default).

    ``env`` (dict or ``K=V`` list) is merged over PATH/HOME; hostname defaults to "godwit";
    the network namespace is new unless ``network_ns_path`` is given. The process runs as
    ``uid``/``gid`` with ``additional_gids`` and the bounding set ``capabilities``; a
    non-root process gets no ambient capabilities (it holds none, as under Docker).
    """
    netns: dict[str, str] = {"type": "network"}
    if network_ns_path:
        netns["path"] = network_ns_path
    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")] + [netns],
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    caps = {k: list(capabilities) for k in ("bounding", "effective", "permitted", "ambient")}
    if uid != 0:
        caps["ambient"] = []
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional_gids:
        user["additionalGids"] = list(additional_gids)
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": user,
            "args": list(args),
            "env": _env_list(env),
            "cwd": cwd,
            "capabilities": caps,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname or "godwit",
        "mounts": _mounts(),
        "linux": linux,
    }


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


def load_config(bundle_dir: Path) -> dict[str, Any]:
    """Read ``bundle_dir/config.json``."""
    return json.loads((Path(bundle_dir) / "config.json").read_text())


def save_config(bundle_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``bundle_dir/config.json``; returns its path."""
    path = Path(bundle_dir) / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def rewrite_for_host(config: dict[str, Any], *, rootfs: Path, cgroups_path: str) -> dict[str, Any]:
    """Copy of ``config`` with an absolute root.path and this host's cgroupsPath."""
    new = copy.deepcopy(config)
    new["root"]["path"] = str(Path(rootfs).resolve())
    new.setdefault("linux", {})["cgroupsPath"] = cgroups_path
    return new


def counter_bundle(bundle_dir: Path, **kw: Any) -> Path:
    """Bundle whose shell increments an in-memory counter every 100 ms into ``/count``."""
    return write_bundle(bundle_dir, ["/bin/sh", "-c", COUNTER_SCRIPT], **kw)


def read_count(rootfs: Path) -> int | None:
    """The counter bundle's current value, or None before its first write."""
    try:
        return int((Path(rootfs) / "count").read_text())
    except (FileNotFoundError, ValueError):
        return None
