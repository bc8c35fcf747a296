"""Facts about host processes, read from /proc."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of /proc/PID/stat (after the command name), or None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def start_time(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (tells a reused pid apart)."""
    fields = stat_fields(pid)
    return fields[19] if fields else None
