"""Steps run together, failing as one step would."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def concurrently(*steps: Awaitable[None]) -> None:
    """Run `steps` together until all have ended. The first to fail cancels the others,
    and its exception is raised as it is (not in an ExceptionGroup, its cause kept), so
    that callers handle it as they would the same step run alone. Cancelled from
    outside, all are."""
    first_failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            for step in steps:
                group.create_task(step)
    except BaseExceptionGroup as failed:
        first_failure = failed.exceptions[0]
    if first_failure is not None:
        raise first_failure
