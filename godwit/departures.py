"""Containers that moved away for good: hidden at once, deleted in the background.

Once a migration has committed, the source's frozen copy only has to go; deleting it (the
kill, the kernel freeing its memory, `runc delete`, its files) took 0.1 s at 1 GiB and
1.2 s at 8 GiB before the client had its answer. `Departures.start` hides the container's
record instead (`record()`, `names()` and so `godwit ps` no longer see it; `exists()`
still does, so nothing new takes the name meanwhile) and deletes it in a task of its own.
A new container of that name waits for the deletion (`settled`); an agent restart deletes
what a stopped agent left (`sweep`). A deletion that fails puts the record back: `godwit
ps` shows the copy and `godwit rm` ends it, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from godwit import faults
from godwit.errors import GodwitError
from godwit.fsio import atomic_write

if TYPE_CHECKING:
    from godwit.containers import ContainerStore

log = logging.getLogger("godwit.departures")
DEPARTED = "departed.json"  # the record of a departed container, beside its files
RECORD = "record.json"
SETTLE_TIMEOUT_S = 60  # a new container of the name waits this long for the deletion


class Departures:
    """The background deletions of one host's departed containers."""

    def __init__(self, store: ContainerStore) -> None:
        self.store = store
        self.tasks: dict[str, asyncio.Task] = {}

    def start(self, name: str, *, keep_rootfs: bool,
              then: Callable[[], Awaitable[None]] | None = None) -> None:
        """Hide the container's record now and delete the container in the background
        (its rootfs kept with `keep_rootfs`: shared storage); `then` runs after it."""
        directory = self.store.dir(name)
        if name in self.tasks or not (directory / RECORD).exists():
            return  # being deleted already, or gone
        record = json.loads((directory / RECORD).read_text())
        atomic_write(directory / DEPARTED, json.dumps({**record, "keep_rootfs": keep_rootfs}))
        (directory / RECORD).unlink()
        self._spawn(name, self._delete(name, then))

    def sweep(self) -> None:
        """At agent start: delete the departed containers a previous agent left."""
        for path in sorted(self.store.root.glob(f"*/{DEPARTED}")):
            if path.parent.name not in self.tasks:
                self._spawn(path.parent.name, self._delete(path.parent.name))

    async def settled(self, name: str, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait (at most `timeout` s) until a departing container of `name` is deleted."""
        if task := self.tasks.get(name):
            await asyncio.wait({task}, timeout=timeout)

    async def close(self, timeout: float) -> None:
        """At agent stop: let the deletions under way finish (the next start sweeps)."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=timeout)

    def _spawn(self, name: str, deletion: Awaitable[None]) -> None:
        task = asyncio.ensure_future(deletion)
        self.tasks[name] = task
        task.add_done_callback(lambda _: self.tasks.pop(name, None))

    async def _delete(self, name: str,
                      then: Callable[[], Awaitable[None]] | None = None) -> None:
        await faults.point("departure")
        directory = self.store.dir(name)
        try:
            fields = json.loads((directory / DEPARTED).read_text())
        except (OSError, ValueError) as exc:  # written atomically here: a damaged disk only
            log.warning("departed container %s left as it is: %s: %s", name, DEPARTED, exc)
            return
        keep_rootfs = fields.pop("keep_rootfs", False)
        try:
            await self.store.discard(self.store.record_from(fields), keep_rootfs=keep_rootfs)
        except (GodwitError, OSError, TypeError) as exc:
            log.warning("departed container %s not deleted: %s (kept: `godwit rm` ends it)",
                        name, exc)
            atomic_write(directory / RECORD, json.dumps(fields, indent=1))
            (directory / DEPARTED).unlink(missing_ok=True)
        if then:
            try:
                await then()
            except Exception:  # its own leftovers only: the container is deleted
                log.exception("after deleting departed container %s", name)
