"""Background asyncio tasks of the service (the manager's poller, the batcher's loop)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel a task and wait until it has finished; None is a no-op."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
