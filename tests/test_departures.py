"""A container that migrated away for good: hidden on its source at once, deleted there in
the background (godwit.departures)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import cli_json, copies, wait_for
from faultmatrix import faulty_agent, runc_names

from godwit.departures import DEPARTED, RECORD, Departures
from godwit.errors import GodwitError
from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import memhog_bundle, read_state


def record_dir(bed: Testbed, host: str, name: str) -> Path:
    return bed.host(host).state_dir / "containers" / name


def gone_from(bed: Testbed, host: str, name: str) -> bool:
    return name not in runc_names(bed, host) and not record_dir(bed, host, name).exists()


def run(bed: Testbed, name: str, bundle: Path, host: str = "a") -> Path:
    result = bed.godwit("run", name, "--bundle", str(bundle), "--host", host)
    assert result.returncode == 0, result.stderr
    return Path(next(r["rootfs"] for r in cli_json(bed, "ps")["containers"]
                     if r["name"] == name))


def migrate(bed: Testbed, name: str, to: str) -> dict:
    result = bed.godwit("migrate", name, "--to", to, "--json", "--strategy", "stop-and-copy")
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    assert result.returncode == 0 and report.get("result") == "ok", (report, result.stderr)
    return report


@pytest.mark.integration
def test_source_copy_is_hidden_at_once_and_deleted_after_the_answer(bed: Testbed) -> None:
    """The answer comes before the deletion (held 3 s here by a fault point): `godwit ps`
    shows only b's copy while runc on a still has the departing one."""
    run(bed, "leaver", counter_bundle(bed.bundle_dir("leaver")))
    with faulty_agent(bed, "a", "departure:pause"):
        migrate(bed, "leaver", "b")
        assert "leaver" in runc_names(bed, "a"), "deleted before the answer"  # first: fast
        assert copies(bed, "leaver") == [("b", "running")]
        wait_for(lambda: gone_from(bed, "a", "leaver"), timeout=20, what="a's copy deleted")
    bed.godwit("rm", "leaver")


@pytest.mark.integration
def test_container_sent_straight_back_waits_for_its_departure(bed: Testbed) -> None:
    """a → b → a at once: the second migration's prepare on a waits until a has deleted
    the first one's source copy, instead of refusing the name."""
    rootfs = run(bed, "boomerang", memhog_bundle(bed.bundle_dir("boomerang"), 64, seed=3))
    wait_for(lambda: read_state(rootfs).get("status") == "ready", timeout=60, what="memhog")
    with faulty_agent(bed, "a", "departure:pause"):
        migrate(bed, "boomerang", "b")
        migrate(bed, "boomerang", "a")
    assert copies(bed, "boomerang") == [("a", "running")]
    wait_for(lambda: gone_from(bed, "b", "boomerang"), timeout=20, what="b's copy deleted")
    bed.godwit("rm", "boomerang")


@pytest.mark.integration
def test_agent_killed_before_the_deletion_deletes_on_restart(bed: Testbed) -> None:
    """a's agent dies once the migration committed, before deleting the copy that left
    (the client may miss the answer): its next start deletes it."""
    rootfs = run(bed, "stranded", counter_bundle(bed.bundle_dir("stranded")))
    wait_for(lambda: read_count(rootfs), what="counter")
    with faulty_agent(bed, "a", "departure:crash"):
        bed.godwit("migrate", "stranded", "--to", "b", "--strategy", "stop-and-copy")
        assert "stranded" in runc_names(bed, "a")
    wait_for(lambda: gone_from(bed, "a", "stranded"), timeout=20, what="a's copy deleted")
    assert copies(bed, "stranded") == [("b", "running")]
    bed.godwit("rm", "stranded")


class FailingStore:
    """Just what Departures uses of a ContainerStore; its deletions fail."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, name: str) -> Path:
        return self.root / name

    @staticmethod
    def record_from(fields: dict) -> dict:
        return fields

    async def discard(self, record: dict, *, keep_rootfs: bool = False) -> None:
        raise GodwitError("runc delete failed")


def test_failed_deletion_puts_the_record_back(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / RECORD).write_text(json.dumps({"name": "x"}))
    after: list[str] = []

    async def depart() -> None:
        departures = Departures(FailingStore(tmp_path))  # type: ignore[arg-type]

        async def then() -> None:
            after.append("then")

        departures.start("x", keep_rootfs=False, then=then)
        assert not (tmp_path / "x" / RECORD).exists()
        await departures.settled("x")

    asyncio.run(depart())
    assert json.loads((tmp_path / "x" / RECORD).read_text()) == {"name": "x"}
    assert not (tmp_path / "x" / DEPARTED).exists() and after == ["then"]
