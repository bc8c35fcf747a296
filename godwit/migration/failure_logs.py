"""CRIU and runc logs of failed migrations, kept on each host for `godwit report ID --logs`.

A migration's logs live in its work dir (source: `<state>/outgoing/<id>/dump-work/`,
destination: `<state>/incoming/<id>/work/`), which goes when the migration ends. When it
failed, was rolled back or ended in doubt, the logs are first copied to
`<state>/failed-logs/<id>/`. Retention per host: the newest `MAX_MIGRATIONS` migrations
and at most `MAX_TOTAL_BYTES` in all (the newest is always kept); a log longer than
`MAX_FILE_BYTES` keeps its head and its tail. The logs of a successful migration are not
kept.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from godwit.errors import GodwitError

log = logging.getLogger("godwit.failure_logs")
MAX_MIGRATIONS = 20
MAX_TOTAL_BYTES = 64 << 20
MAX_FILE_BYTES = 8 << 20
HEAD_BYTES = 1 << 20  # of a log cut to MAX_FILE_BYTES: its start, the rest from its end
_ID = re.compile(r"[0-9a-f-]{1,64}")
_TMP = ".tmp-"


class FailureLogs:
    """The kept logs of one host, one directory per migration."""

    def __init__(self, directory: Path, max_migrations: int = MAX_MIGRATIONS,
                 max_bytes: int = MAX_TOTAL_BYTES) -> None:
        self.directory = directory
        self.max_migrations, self.max_bytes = max_migrations, max_bytes

    def keep(self, migration_id: str, logs: Mapping[str, Path]) -> None:
        """Copy `logs` (kept name -> path; missing files are skipped) for a migration, then
        drop what retention no longer allows. Never raises: diagnosis must not get in the
        way of a rollback."""
        try:
            self._keep(migration_id, logs)
        except (OSError, GodwitError) as exc:
            log.warning("logs of migration %s not kept: %s", migration_id, exc)

    def _keep(self, migration_id: str, logs: Mapping[str, Path]) -> None:
        present = {name: path for name, path in logs.items() if path.is_file()}
        if not present:
            return
        target = self._dir(migration_id)
        target.mkdir(parents=True, exist_ok=True)
        for name, path in present.items():
            tmp = target / f"{_TMP}{name}"
            _copy_capped(path, tmp)
            tmp.replace(target / name)
        self.prune()

    def read(self, migration_id: str) -> list[dict]:
        """[{"name", "size", "text"}] of the logs kept for a migration (none: [])."""
        target = self._dir(migration_id)
        if not target.is_dir():
            return []
        return [{"name": path.name, "size": path.stat().st_size,
                 "text": path.read_text(errors="replace")}
                for path in sorted(target.iterdir())
                if path.is_file() and not path.name.startswith(_TMP)]

    def prune(self) -> None:
        """Drop half-written copies, then the oldest migrations beyond the limits."""
        if not self.directory.is_dir():
            return
        for leftover in self.directory.glob(f"*/{_TMP}*"):
            leftover.unlink(missing_ok=True)
        kept = sorted((d for d in self.directory.iterdir() if d.is_dir()),
                      key=lambda d: d.stat().st_mtime, reverse=True)
        total = 0
        for rank, directory in enumerate(kept):
            total += sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            if rank and (rank >= self.max_migrations or total > self.max_bytes):
                shutil.rmtree(directory, ignore_errors=True)

    def _dir(self, migration_id: str) -> Path:
        if not _ID.fullmatch(migration_id):
            raise GodwitError(f"invalid migration id {migration_id!r}")
        return self.directory / migration_id


def _copy_capped(source: Path, target: Path) -> None:
    """Copy a log; one longer than MAX_FILE_BYTES keeps its head and tail, the cut marked."""
    size = source.stat().st_size
    if size <= MAX_FILE_BYTES:
        shutil.copyfile(source, target)
        return
    tail = MAX_FILE_BYTES - HEAD_BYTES
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(src.read(HEAD_BYTES))
        dst.write(f"\n[... {size - MAX_FILE_BYTES} bytes cut by godwit ...]\n".encode())
        src.seek(size - tail)
        shutil.copyfileobj(src, dst)
