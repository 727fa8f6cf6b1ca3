"""Dynamic batching: concurrent requests merged into one call of the ensemble.

Requests are queued with the ensemble object they resolved (so a batch never mixes versions).
One inference runs at a time, in a dedicated thread, off the event loop. While it runs, new
requests queue up; when it finishes, everything queued for the same ensemble, up to
`max_batch_size` rows, becomes the next batch. A lone request therefore runs at once, and
under load batches grow by themselves. `max_delay_seconds` may additionally hold a partial
batch back for company (0 by default: measured, waiting never paid off on these models).

The queue is bounded in rows; a full queue refuses at once (429). A request with more rows
than a batch holds is split into chunks. A batch that fails fails each of its requests with
the error; a batch whose outputs do not match its inputs in number fails likewise. Requests
whose deadline has passed while queued are answered 504 and not computed.

This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from service.background import cancel
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """What the batcher calls: rows in, (averaged, per-member) probabilities out."""

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def split_rows(rows: int, limit: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering `rows` in chunks of at most `limit`."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return [(start, min(start + limit, rows)) for start in range(0, rows, limit)]


def take_batch(queue: deque, limit: int) -> list:
    """Pop the head of the queue and every following item for the same predictor while the
    batch stays within `limit` rows; items for other predictors keep their place."""
    head = queue.popleft()
    batch, rows = [head], len(head.x)
    kept = deque()
    while queue:
        item = queue.popleft()
        if item.predictor is head.predictor and rows + len(item.x) <= limit:
            batch.append(item)
            rows += len(item.x)
        else:
            kept.append(item)
            if rows >= limit:
                break
    kept.extend(queue)
    queue.clear()
    queue.extend(kept)
    return batch


@dataclass(eq=False)
class _Item:
    predictor: Predictor
    x: np.ndarray
    future: asyncio.Future
    enqueued: float
    deadline: float | None


@dataclass
class BatchStats:
    """Observations handed to a metrics sink after each batch."""

    rows: int
    requests: int
    queue_wait: list[float] = field(default_factory=list)
    inference_seconds: float = 0.0
    model: str = ""
    classes: tuple[str, ...] = ()
    average: np.ndarray | None = None  # the batch's outputs, for disagreement and class metrics
    members: np.ndarray | None = None


class Batcher:
    """Merges concurrent `submit` calls into batched `predict` calls on one worker thread."""

    def __init__(
        self,
        max_batch_size: int = 64,
        max_delay_seconds: float = 0.0,
        max_queue_rows: int = 4096,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue_rows < 1 or max_delay_seconds < 0:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1, max_delay_seconds >= 0")
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_seconds
        self.max_queue_rows = max_queue_rows
        self.on_batch = on_batch or (lambda stats: None)
        self.on_depth = on_depth or (lambda depth: None)
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._closing = False
        self._running = False

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def drain(self, timeout: float) -> bool:
        """Refuse new work and let what is queued finish, for at most `timeout` seconds;
        True if nothing was left."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while (self._queue or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not (self._queue or self._running)

    async def stop(self) -> None:
        """Refuse new work, stop the loop, and fail whatever is still queued."""
        self._closing = True
        await cancel(self._task)
        self._task = None
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(NotReady("the service is shutting down"))
        self._queue.clear()
        self._queued_rows = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check_admission(self) -> None:
        """Refuse at once when nothing more can be queued: called before a body is parsed, so
        an overloaded service spends next to nothing on the requests it turns away."""
        if self._closing:
            raise NotReady("the service is shutting down")
        if self._queued_rows >= self.max_queue_rows:
            raise QueueFull(f"the queue is full ({self._queued_rows} rows, the limit is {self.max_queue_rows})")

    async def submit(self, predictor: Predictor, x: np.ndarray, deadline: float | None = None):
        """(averaged, per-member) probabilities for x, computed in some batch."""
        rows = len(x)
        if self._closing:
            raise NotReady("the service is shutting down")
        if self._queued_rows + rows > self.max_queue_rows:
            raise QueueFull(
                f"the queue holds {self._queued_rows} rows; {rows} more would pass the limit of "
                f"{self.max_queue_rows}"
            )
        loop = asyncio.get_running_loop()
        chunks = split_rows(rows, self.max_batch_size)
        futures = []
        now = time.monotonic()
        for start, stop in chunks:
            future = loop.create_future()
            self._queue.append(_Item(predictor, x[start:stop], future, now, deadline))
            futures.append(future)
        self._queued_rows += rows
        self.on_depth(self._queued_rows)
        self._wakeup.set()
        if len(futures) == 1:
            return await futures[0]
        parts = await asyncio.gather(*futures)
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_delay > 0:
                await self._wait_for_company()
            batch = take_batch(self._queue, self.max_batch_size)
            self._queued_rows -= sum(len(item.x) for item in batch)
            self.on_depth(self._queued_rows)
            batch = self._drop_expired(batch)
            if not batch:
                continue
            self._running = True
            try:
                await self._execute(loop, batch)
            finally:
                self._running = False

    async def _wait_for_company(self) -> None:
        """Hold a partial batch until it fills or its oldest request has waited max_delay."""
        oldest = self._queue[0].enqueued
        while self._queued_rows < self.max_batch_size:
            remaining = oldest + self.max_delay - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _drop_expired(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # the client went away
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(DeadlineExceeded(
                    f"the request's deadline passed after {now - item.enqueued:.3f} s in the queue; "
                    "it was not computed"))
            else:
                live.append(item)
        return live

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        started = time.monotonic()
        x = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
        try:
            average, members = await loop.run_in_executor(self._executor, batch[0].predictor.predict, x)
            if len(average) != len(x) or len(members) != len(x):
                raise InferenceFailed(f"the ensemble returned {len(average)} rows for a batch of {len(x)}")
        except Exception as exc:  # every waiter gets the error, the batcher keeps serving
            error = exc if isinstance(exc, InferenceFailed) else InferenceFailed(f"inference failed: {exc}")
            log.error("batch of %d rows failed: %s", len(x), error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        offset = 0
        for item in batch:
            n = len(item.x)
            if not item.future.done():
                item.future.set_result((average[offset:offset + n], members[offset:offset + n]))
            offset += n
        predictor = batch[0].predictor
        classes = getattr(predictor, "classes", ())
        self.on_batch(BatchStats(len(x), len(batch), [started - item.enqueued for item in batch],
                                 time.monotonic() - started, getattr(predictor, "name", ""), classes,
                                 average if classes else None, members if classes else None))

