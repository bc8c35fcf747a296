"""Pre-copy: copy memory while the container runs, then freeze and send only what changed.

Each round is a CRIU pre-dump (`runc checkpoint --pre-dump`) chained to the previous one
with `--parent-path`; the kernel's soft-dirty bits tell CRIU which pages changed since.
Rounds stop when the dirty set is small or no longer shrinking; the final dump then holds
only the pages dirtied since the last round. Needs soft-dirty tracking on the source.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from godwit.criu import log_error
from godwit.errors import GodwitError
from godwit.migration import AUTO_LAZY_MIN_BYTES
from godwit.migration.source import SourceMigration
from godwit.preflight import Need
from godwit.runc import CheckpointOptions
from godwit.transport import plan_tree

MAX_ROUNDS = 5
CONVERGED_BYTES = 8 << 20
MIN_SHRINK = 0.8  # a round must cut the dirty set by 20 % to be worth another


class PreCopy(SourceMigration):
    strategy = "pre-copy"
    stream_pages = False  # the final dump's pages refer to its parent's, kept on disk here
    fill_after_restore = False  # a lazy restore would read them through the parents
    needs = (Need("source", "soft_dirty", "soft-dirty memory tracking"),
             Need("source", "pre_dump", "`runc checkpoint --pre-dump --parent-path`",
                  runc=True))
    auto_rank = 0  # before post-copy: the source keeps a complete copy until the commit
    auto_min_memory = AUTO_LAZY_MIN_BYTES
    upload_rounds = MAX_ROUNDS
    rounds = 0

    async def before_freeze(self) -> None:
        """Pre-dump rounds until the dirty set is small or stops shrinking."""
        previous: int | None = None
        while self.rounds < MAX_ROUNDS:
            sent = await self.pre_dump_round()
            if sent <= CONVERGED_BYTES or (previous and sent > previous * MIN_SHRINK):
                return
            previous = sent

    async def pre_dump_round(self) -> int:
        """One live pre-dump, sent to the destination; returns its bytes."""
        self.rounds += 1
        images = self.ctx.work_dir / f"pre-{self.rounds}"
        images.mkdir(parents=True, exist_ok=True)
        opts = CheckpointOptions(image_path=images, work_path=self.ctx.work_dir / "dump-work",
                                 pre_dump=True, parent_path=self.parent_path())
        phase = f"pre-dump-{self.rounds}"
        with self.events.phase(phase):
            try:
                await self.runc.checkpoint(self.name, opts)
            except GodwitError as exc:
                cause = log_error(opts.work_path, "dump.log") or exc
                raise GodwitError(f"pre-dump failed: {cause}") from exc
            plan = await asyncio.to_thread(plan_tree, images)
            self.report.image_bytes += await self.upload(images.name, plan, phase)
        return plan.total_bytes

    def parent_path(self) -> str | None:
        """CRIU resolves it relative to the new image dir: the previous round's dir."""
        return f"../pre-{self.rounds - 1}" if self.rounds > 1 else None

    def dump_options(self) -> CheckpointOptions:
        return replace(super().dump_options(), parent_path=f"../pre-{self.rounds}")
