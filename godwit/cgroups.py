"""Where a host's cgroups live: the cgroup file system's mount point and the hierarchies
below it (cgroup v1 controllers and v1's "unified", or the cgroup v2 root itself)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "godwit"  # a container's cgroup: /godwit/<its host's netns id>/<name>


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """`root` (the v2 hierarchy) and every directory below it (the v1 hierarchies)."""
    return [root, *(p for p in root.iterdir() if p.is_dir())]


def remove_empty(pattern: str, root: Path = CGROUP_ROOT) -> list[str]:
    """rmdir the cgroup dirs matching `pattern` (a glob below a hierarchy, e.g.
    ``godwit/gw1-*``) in every hierarchy, deepest first, where empty: one still in use
    stays. Returns the matched paths now gone, relative to their hierarchy."""
    removed = set()
    for hierarchy in hierarchies(root):
        for top in hierarchy.glob(pattern):
            for path, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):  # in use (a process in it), or gone
                    os.rmdir(path)
            if not top.exists():
                removed.add(str(top.relative_to(hierarchy)))
    return sorted(removed)
