"""Where a host's cgroups live: the cgroup file system's mount point and the hierarchies
below it (cgroup v1 controllers and v1's "unified", or the cgroup v2 root itself)."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "godwit"  # a container's cgroup: /godwit/<its host's netns id>/<name>


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """`root` (the v2 hierarchy) and every directory below it (the v1 hierarchies)."""
    return [root, *(p for p in root.iterdir() if p.is_dir())]
