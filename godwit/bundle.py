"""OCI bundles for runc: config.json generation, loading, saving and rewriting.

The busybox rootfs and the test bundles built on it are in :mod:`godwit.lab.bundles`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
