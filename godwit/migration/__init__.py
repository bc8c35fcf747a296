"""Migrations: their options here; strategies, states, journals and the service in the
modules of this package."""

from __future__ import annotations

import msgspec

from godwit.errors import GodwitError

MIN_FREEZE_S = 0.5
FREEZE_FLOOR_S = 30.0  # the default freeze deadline: this much, plus the memory's
SLOW_LINK_BPS = 100e6  # transfer over a link this slow (MB/s; this VM does ~400 MB/s)
OBSOLETE_OPTIONS = {"tcp_established"}  # always on now; older journals may still name it


class MigrationOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the operator asked for (the body of `POST /v1/containers/{name}/migrate`);
    validated before anything is touched."""

    to: str
    strategy: str = "auto"
    shared_storage: bool = False
    compress: bool = False
    bandwidth_mbps: float | None = None
    commit_timeout: float = 60.0
    max_clock_skew: float = 0.5
    max_freeze: float | None = None  # seconds; None: default_max_freeze of the memory
    progress_timeout: float = 30.0  # before the freeze: seconds a step may make no progress
    eager_restore: bool = False  # stop-and-copy: copy the memory in the restore, frozen

    def __post_init__(self) -> None:
        if not self.to:
            raise GodwitError("a destination host is required")
        # the registry imports the strategies, which import this module: looked up late
        from godwit.migration.strategies import check_strategy

        check_strategy(self.strategy)
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise GodwitError("--bandwidth must be a positive number of MB/s")
        if self.max_clock_skew <= 0:
            raise GodwitError("--max-clock-skew must be positive")
        if self.commit_timeout < 5:
            raise GodwitError("commit timeout must be at least 5 seconds")
        if self.progress_timeout < 1:
            raise GodwitError("--progress-timeout must be at least 1 s")
        if self.max_freeze is not None and self.max_freeze < MIN_FREEZE_S:
            raise GodwitError(f"--max-freeze must be at least {MIN_FREEZE_S:g} s")

    @classmethod
    def from_json(cls, data: dict) -> MigrationOptions:
        """Options saved in a journal (a request body goes through godwit.protocol)."""
        data = {k: v for k, v in data.items() if k not in OBSOLETE_OPTIONS}
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise GodwitError(f"bad migration options: {exc}") from exc

    def to_json(self) -> dict:
        return msgspec.structs.asdict(self)

    @property
    def rate_limit(self) -> float | None:
        """Bytes per second on the wire, or None for unlimited."""
        return self.bandwidth_mbps * 1e6 if self.bandwidth_mbps else None


def default_max_freeze(memory: int) -> float:
    """Seconds a container of this memory may stay frozen when the operator sets no
    --max-freeze: a floor for CRIU's fixed costs, plus its memory over a slow link."""
    return FREEZE_FLOOR_S + memory / SLOW_LINK_BPS


# Where post-copy's freeze becomes shorter than stop-and-copy's (bench/results/crossover.md:
# between 8 and 16 MiB on an idle machine; 216 against 130 ms at 16 MiB, 471/139 at 64).
# Below it, `--strategy auto` keeps stop-and-copy's stronger guarantee (a complete source
# copy until commit) for a freeze as short (see strategies.choose_strategy).
AUTO_LAZY_MIN_BYTES = 16 << 20
