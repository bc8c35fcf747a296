"""The source's journal of each outgoing migration: how far it got (a `Stage`), so that an
agent restarted half way can settle it (see `SourceMigration.recover`).

Layout: `<state>/outgoing/<id>/` is a migration's work dir (images, CRIU's work files) and
`<state>/outgoing/<id>/journal.json` its journal, replaced atomically and fsync'd at each
stage. A journal exists from the destination's prepare until the migration is settled;
one left after an in-doubt end blocks the container's next migration until the operator
decides (`godwit resume` or `godwit rm`).

Journals of the earlier format (booleans `prepared`, `frozen`, `isolated`, `restore_sent`,
`restored`, `commit_sent` instead of `stage`) are still read: an agent upgraded while a
migration was in flight settles it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from godwit.fsio import atomic_write, replace_file
from godwit.migration.states import Stage

log = logging.getLogger("godwit.journal")
FILE = "journal.json"
FORMAT = 2
# The earlier format's flags, newest stage first: the highest one set is the stage.
_LEGACY_FLAGS = (("commit_sent", Stage.COMMIT_SENT), ("restored", Stage.RESTORED),
                 ("restore_sent", Stage.RESTORE_SENT), ("isolated", Stage.ISOLATED),
                 ("frozen", Stage.FROZEN))
_LEGACY_KEYS = {"prepared", *(flag for flag, _ in _LEGACY_FLAGS)}
_KEYS = {"format", "id", "name", "strategy", "options", "stage", "extra"}


@dataclass
class Journal:
    """One outgoing migration's record. `extra`: a strategy's own facts (post-copy's
    page server process)."""

    id: str
    name: str
    strategy: str
    options: dict
    stage: Stage = Stage.NEW
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "id": self.id, "name": self.name,
                "strategy": self.strategy, "options": self.options,
                "stage": self.stage.label, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict) -> Journal:
        """Either format (see the module's docstring)."""
        if "stage" in data:
            stage, extra = Stage.from_label(data["stage"]), dict(data.get("extra") or {})
        else:
            stage = next((s for flag, s in _LEGACY_FLAGS if data.get(flag)), Stage.PREPARED)
            extra = {k: v for k, v in data.items() if k not in _KEYS | _LEGACY_KEYS}
        return cls(str(data["id"]), str(data["name"]), str(data["strategy"]),
                   dict(data["options"]), stage, extra)


class Journals:
    """The journals and work dirs of one agent's outgoing migrations."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "outgoing"

    def work_dir(self, migration_id: str) -> Path:
        return self.root / migration_id

    def save(self, journal: Journal, durable: bool = True) -> None:
        """Write the journal; not `durable`: without fsync, for a fact that dies with the
        host anyway (the next durable save carries it to disk)."""
        path = self.work_dir(journal.id) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write = atomic_write if durable else replace_file
        write(path, json.dumps(journal.to_json()))

    def all(self) -> list[Journal]:
        """Every unsettled migration's journal, oldest id first; one that cannot be read
        is logged and left alone (it must not block the others)."""
        journals = []
        for path in sorted(self.root.glob(f"*/{FILE}")):
            try:
                journals.append(Journal.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("unreadable migration journal %s: %s", path, exc)
        return journals

    def of(self, name: str) -> list[Journal]:
        """The unsettled (in-doubt) migrations of one container."""
        return [journal for journal in self.all() if journal.name == name]

    def discard(self, migration_id: str) -> None:
        """Forget the journal, keeping the work dir's files."""
        (self.work_dir(migration_id) / FILE).unlink(missing_ok=True)

    def drop(self, migration_id: str) -> None:
        """The migration is settled: its journal and work dir go."""
        shutil.rmtree(self.work_dir(migration_id), ignore_errors=True)
