"""The states of a migration, each named once: how far the source got (`Stage`, saved in
its journal), where the destination stands (`DestinationState`, saved in its staging
area), and how a migration ended (`Result`, in its report).

Standard library only: the fence watchdog (`python -m godwit.fence`) imports it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Stage(IntEnum):
    """How far a source got, in order; saved (see `journal.py`) before the step it names
    acts, so a restarted agent assumes the step may have happened."""

    NEW = 0  # nothing asked of the destination yet: no journal
    PREPARED = 1  # the destination staged the migration (name, netns reserved there)
    FROZEN = 2  # the source copy is (being) paused
    ISOLATED = 3  # a networked source copy is (being) cut off its link
    RESTORE_SENT = 4  # the destination was asked to restore: a copy may run there
    RESTORED = 5  # the destination's copy ran
    COMMIT_SENT = 6  # the commit was sent: only the destination knows whether it took it

    @property
    def label(self) -> str:
        """The name saved in a journal."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Stage:
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown migration stage {label!r}") from None


class DestinationState(StrEnum):
    """An incoming migration on the destination. The first two are saved by the receiver;
    from the restore on, the fence's decision holds the state (see `godwit.fence`)."""

    UNKNOWN = "unknown"  # no such migration here (never staged, or dropped)
    PREPARED = "prepared"  # staged: files may arrive
    ARMED = "armed"  # rootfs in place, bundle written, a held restore started
    PENDING = "pending"  # restored; the fence kills it unless committed in time
    COMMITTED = "committed"
    ABORTED = "aborted"
    FENCED = "fenced"  # the commit did not come in time: the fence killed the copy

    @property
    def before_restore(self) -> bool:
        return self in (DestinationState.PREPARED, DestinationState.ARMED)

    @property
    def restored(self) -> bool:
        """A restore began: the fence's decision holds the state from then on."""
        return self in _DECISIONS

    @property
    def finished(self) -> bool:
        return self in _DECISIONS and self is not DestinationState.PENDING


_DECISIONS = frozenset({DestinationState.PENDING, DestinationState.COMMITTED,
                        DestinationState.ABORTED, DestinationState.FENCED})


class Result(StrEnum):
    """How a migration ended, as its report says."""

    RUNNING = "running"  # not ended yet
    OK = "ok"  # the destination runs the container for good
    FAILED = "failed"  # rolled back: the source runs it (or never stopped it)
    IN_DOUBT = "in-doubt"  # the source copy stays paused until the operator decides
