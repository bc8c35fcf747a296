"""The fence watchdog's decision, without a container: it kills an aborted or
uncommitted copy, never a committed one, even once the staging area is gone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from godwit import fence
from godwit.migration.states import DestinationState


def decide_later(path: Path, decision: DestinationState,
                 then_delete: bool = False) -> threading.Thread:
    def act() -> None:
        time.sleep(0.1)
        fence.decide(path, decision)
        if then_delete:
            path.unlink()

    thread = threading.Thread(target=act)
    thread.start()
    return thread


def test_an_uncommitted_copy_is_fenced_at_the_deadline(tmp_path: Path) -> None:
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    assert fence._must_kill(decision, time.monotonic() + 0.3)
    assert fence.read_decision(decision) == DestinationState.FENCED


def test_a_committed_copy_survives_its_staging_area_going(tmp_path: Path) -> None:
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    committer = decide_later(decision, DestinationState.COMMITTED, then_delete=True)
    assert not fence._must_kill(decision, time.monotonic() + 10)  # returns at the commit
    committer.join()
    assert not decision.exists()


def test_an_aborted_copy_is_killed_too(tmp_path: Path) -> None:
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    aborter = decide_later(decision, DestinationState.ABORTED)
    assert fence._must_kill(decision, time.monotonic() + 5)
    aborter.join()


def test_a_decision_dropped_before_the_watchdog_started_reads_as_aborted(
        tmp_path: Path) -> None:
    assert fence._must_kill(tmp_path / "gone", time.monotonic() + 5)


def _standby(tmp_path: Path, seconds: float) -> tuple[fence.Standby, Path, Path]:
    """A standby watchdog over a stand-in container: its directory goes when it is fenced
    (runc is `true`)."""
    decision, container = tmp_path / "decision", tmp_path / "container"
    decision.write_text(DestinationState.ARMED)
    container.mkdir()
    order = fence.FenceOrder(decision, seconds, ("true", tmp_path), "c1", container)
    return fence.Standby(order), decision, container


def test_a_standby_watchdog_fences_once_armed(tmp_path: Path) -> None:
    standby, decision, container = _standby(tmp_path, 0.3)
    time.sleep(0.5)  # before arm(): the clock does not run
    assert container.exists() and standby.process.poll() is None
    standby.arm()
    assert fence.read_decision(decision) in (DestinationState.PENDING,
                                             DestinationState.FENCED)
    assert standby.process.wait(timeout=10) == 0
    assert fence.read_decision(decision) == DestinationState.FENCED
    assert not container.exists()


def test_a_standby_never_armed_exits_and_fences_nothing(tmp_path: Path) -> None:
    standby, decision, container = _standby(tmp_path, 0.1)
    standby.close()
    assert standby.process.wait(timeout=10) == 0
    assert fence.read_decision(decision) == DestinationState.ARMED
    assert container.exists()


def test_a_standby_that_died_is_replaced_when_armed(tmp_path: Path) -> None:
    standby, decision, container = _standby(tmp_path, 0.2)
    standby.process.kill()
    standby.process.wait()
    standby.arm()
    deadline = time.monotonic() + 10
    while container.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fence.read_decision(decision) == DestinationState.FENCED
    assert not container.exists()
