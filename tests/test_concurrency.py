"""godwit.concurrency: steps run together fail as one step would."""

from __future__ import annotations

import asyncio

import pytest

from godwit.concurrency import concurrently
from godwit.errors import GodwitError


def test_steps_run_together() -> None:
    order: list[str] = []

    async def step(name: str, first_wait: float) -> None:
        order.append(f"{name} starts")
        await asyncio.sleep(first_wait)
        order.append(f"{name} ends")

    asyncio.run(concurrently(step("slow", 0.05), step("quick", 0)))
    assert order == ["slow starts", "quick starts", "quick ends", "slow ends"]


def test_the_first_failure_stops_the_other_and_is_raised_as_it_is() -> None:
    stopped = asyncio.Event()

    async def long_step() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.set()
            raise

    async def failing_step() -> None:
        try:
            raise OSError("disk gone")
        except OSError as exc:
            raise GodwitError("upload failed") from exc

    async def scenario() -> None:
        with pytest.raises(GodwitError, match="upload failed") as raised:
            await concurrently(long_step(), failing_step())
        assert isinstance(raised.value.__cause__, OSError), "its cause is kept"
        assert stopped.is_set(), "the other step was cancelled"

    asyncio.run(scenario())


def test_a_deadline_cancels_every_step() -> None:
    cancelled: list[str] = []

    async def step(name: str) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await concurrently(step("dump"), step("rootfs-sync"))

    asyncio.run(scenario())
    assert sorted(cancelled) == ["dump", "rootfs-sync"]
