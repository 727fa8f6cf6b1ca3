"""Dynamic batching: concurrent requests merged into one call of the ensemble.

Requests are queued with the ensemble object they resolved (so a batch never mixes versions).
Inference runs in dedicated threads, off the event loop; each computes one batch at a time
(the service runs one by default, on all of the process's cores: service.engines.loader's
thread plan says why). While they run, new requests queue up; when a thread finishes, it takes everything
queued for the same ensemble, up to `max_batch_size` rows, as its next batch, and hands the
finished batch's outputs to the event loop. A lone request therefore runs at once, and
under load batches grow by themselves. `max_delay_seconds` may additionally hold a partial
batch back for company (0 by default: measured, waiting never paid off on these models).

The queue is bounded in rows; a full queue refuses at once (429). Its depth is reported each
time a batch is taken (what the batch left behind), not on every request. A request with
more rows than a batch holds is split into chunks. A batch that fails fails each of its requests with
the error; a batch whose outputs do not match its inputs in number fails likewise. Requests
whose deadline has passed while queued are answered 504 and not computed.

This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, NotReady, PayloadTooLarge, QueueFull

log = logging.getLogger(__name__)


Rows = np.ndarray | dict[str, np.ndarray]  # one array, or named arrays of as many rows each


class Predictor(Protocol):
    """What the batcher calls: rows in (one array, or named arrays of as many rows), a tuple of
    arrays out, every one rows first. The batcher gives each request its own rows of every
    array and never reads what they mean (an ensemble's `answer` does: service.answer)."""

    def predict(self, x: Rows) -> tuple[np.ndarray, ...]: ...


def rows_of(x: Rows) -> int:
    """How many rows a request's input has."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def shape_key(x: Rows) -> tuple:
    """What requests must share to be computed in one batch: the shape of a row of every input
    (a variable-length input's requests batch with those of the same length, so no request's
    answer depends on another's padding), and for strings nothing more."""
    if isinstance(x, dict):
        return tuple((name, a.shape[1:]) for name, a in x.items())
    return x.shape[1:]


def rows_between(x: Rows, start: int, stop: int) -> Rows:
    """Rows [start, stop) of every input."""
    return {name: a[start:stop] for name, a in x.items()} if isinstance(x, dict) else x[start:stop]


def joined(parts: list[Rows]) -> Rows:
    """Requests' inputs of one shape key as one batch (the lone request's own arrays)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return np.concatenate(parts)


def split_rows(rows: int, limit: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering `rows` in chunks of at most `limit`."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return [(start, min(start + limit, rows)) for start in range(0, rows, limit)]


def take_batch(queue: deque, limit: int) -> list:
    """Pop the head of the queue and every following item for the same predictor and shape key
    while the batch stays within `limit` rows; other items keep their place."""
    head = queue.popleft()
    batch, rows = [head], head.rows
    kept = deque()
    while queue:
        item = queue.popleft()
        if item.predictor is head.predictor and item.key == head.key and rows + item.rows <= limit:
            batch.append(item)
            rows += item.rows
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
    x: Rows
    future: asyncio.Future
    enqueued: float
    deadline: float | None
    rows: int = 0
    key: tuple = ()


@dataclass
class BatchStats:
    """Observations handed to a metrics sink after each batch."""

    rows: int
    requests: int
    queue_wait: list[float] = field(default_factory=list)
    inference_seconds: float = 0.0
    predictor: Predictor | None = None  # what computed the batch, and its outputs: the metrics
    outputs: tuple[np.ndarray, ...] = ()  # read their meaning (service.metrics.observe_batch)


class Batcher:
    """Merges concurrent `submit` calls into batched `predict` calls on `threads` inference
    threads (each computes one batch at a time; with several, batches compute side by side).

    A thread takes its next batch itself as soon as the previous one is computed, and hands
    the outputs to the event loop with one `call_soon_threadsafe` per batch. The ensemble never
    waits for the loop: under load the loop answers batch k while batch k+1 is computing.
    (When the loop started each batch, most of a batch's time went to waiting for a busy loop
    to notice it had finished: docs/performance.md.)"""

    def __init__(
        self,
        max_batch_size: int = 64,
        max_delay_seconds: float = 0.0,
        max_queue_rows: int = 4096,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        threads: int = 1,
    ):
        if max_batch_size < 1 or max_queue_rows < 1 or max_delay_seconds < 0 or threads < 1:
            raise ValueError("max_batch_size, max_queue_rows and threads must be >= 1, max_delay_seconds >= 0")
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_seconds
        self.max_queue_rows = max_queue_rows
        self.on_batch = on_batch or (lambda stats: None)
        self.on_depth = on_depth or (lambda depth: None)
        # Shared with the inference threads, under `_cond`'s lock: the queue, its row count,
        # the number of batches taken and not yet answered, and the stop flag.
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._unanswered = 0
        self._stopping = False
        self._closing = False  # loop side: refuse new work
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the inference threads; results are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        for i in range(self.threads):
            threading.Thread(target=self._work, name=f"inference-{i}", daemon=True).start()

    async def drain(self, timeout: float) -> bool:
        """Refuse new work and let what is queued finish, for at most `timeout` seconds;
        True if nothing was left."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while (self._queue or self._unanswered) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not (self._queue or self._unanswered)

    async def stop(self) -> None:
        """Refuse new work, stop each thread after its current batch, and fail whatever is
        still queued."""
        self._closing = True
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._cond.notify_all()
        for item in left:
            if not item.future.done():
                item.future.set_exception(NotReady("the service is shutting down"))

    def check_admission(self) -> None:
        """Refuse at once when nothing more can be queued: called before a body is parsed, so
        an overloaded service spends next to nothing on the requests it turns away."""
        if self._closing:
            raise NotReady("the service is shutting down")
        if self._queued_rows >= self.max_queue_rows:
            raise QueueFull(f"the queue is full ({self._queued_rows} rows, the limit is {self.max_queue_rows})")

    async def submit(self, predictor: Predictor, x: Rows,
                     deadline: float | None = None) -> tuple[np.ndarray, ...]:
        """The predictor's outputs for the rows x (x's rows of each), computed in some batch."""
        rows = rows_of(x)
        if self._closing:
            raise NotReady("the service is shutting down")
        if rows > self.max_queue_rows:  # never servable: retrying cannot help, so not a 429
            raise PayloadTooLarge(
                f"{rows} rows are more than the queue ever holds ({self.max_queue_rows}); send at most "
                f"{self.max_queue_rows} rows a request")
        loop = self._loop
        now = time.monotonic()
        key = shape_key(x)
        if rows <= self.max_batch_size:  # the common case: one item, one future
            items = [_Item(predictor, x, loop.create_future(), now, deadline, rows, key)]
        else:
            items = [_Item(predictor, rows_between(x, a, b), loop.create_future(), now, deadline, b - a, key)
                     for a, b in split_rows(rows, self.max_batch_size)]
        with self._cond:
            if self._queued_rows + rows > self.max_queue_rows:
                raise QueueFull(
                    f"the queue holds {self._queued_rows} rows; {rows} more would pass the limit of "
                    f"{self.max_queue_rows}")
            self._queue.extend(items)
            self._queued_rows += rows
            self._cond.notify()
        if len(items) == 1:
            return await items[0].future
        parts = await asyncio.gather(*(item.future for item in items))
        return tuple(np.concatenate(column) for column in zip(*parts))

    # -- the inference thread ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                if self.max_delay > 0:
                    self._wait_for_company()
                    if not self._queue:  # stopped while waiting
                        continue
                batch = take_batch(self._queue, self.max_batch_size)
                self._queued_rows -= sum(item.rows for item in batch)
                depth = self._queued_rows
                self._unanswered += 1
            try:
                answer = self._compute(batch)
            except BaseException as exc:  # a bug here must fail its batch, never the thread
                log.exception("the batch of %d requests could not be computed", len(batch))
                answer = (batch, [], InferenceFailed(f"internal error in the batcher: {type(exc).__name__}"), None)
            try:
                self._loop.call_soon_threadsafe(self._answer, *answer, depth)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return

    def _wait_for_company(self) -> None:
        """With the lock held: hold a partial batch until it fills or its oldest request has
        waited max_delay."""
        oldest = self._queue[0].enqueued
        while self._queued_rows < self.max_batch_size and not self._stopping:
            remaining = oldest + self.max_delay - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _compute(self, batch: list[_Item]):
        """(items computed, items expired, the outputs or the error, stats) for a batch."""
        now = time.monotonic()
        live, expired = [], []
        for item in batch:
            # `done()` read across threads: a request whose client went away is skipped, and
            # a stale read only costs computing it anyway.
            if item.future.done():
                continue
            (expired if item.deadline is not None and now > item.deadline else live).append(item)
        if not live:
            return live, expired, None, None
        x = joined([item.x for item in live])
        rows = sum(item.rows for item in live)
        started = time.monotonic()
        try:
            outputs = tuple(live[0].predictor.predict(x))
            wrong = [len(a) for a in outputs if len(a) != rows]
            if wrong or not outputs:
                raise InferenceFailed(f"the ensemble returned {wrong[0] if wrong else 0} rows for a batch "
                                      f"of {rows}")
        except Exception as exc:  # every waiter gets the error, the batcher keeps serving
            error = exc if isinstance(exc, InferenceFailed) else InferenceFailed(f"inference failed: {exc}")
            log.error("batch of %d rows failed: %s", rows, error)
            return live, expired, error, None
        stats = BatchStats(rows, len(live), [started - item.enqueued for item in live],
                           time.monotonic() - started, live[0].predictor, outputs)
        return live, expired, outputs, stats

    # -- back on the event loop ----------------------------------------------------------------

    def _answer(self, live: list[_Item], expired: list[_Item], outcome, stats: BatchStats | None,
                depth: int) -> None:
        now = time.monotonic()
        for item in expired:
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded(
                    f"the request's deadline passed after {now - item.enqueued:.3f} s in the queue; "
                    "it was not computed"))
        if isinstance(outcome, BaseException):
            for item in live:
                if not item.future.done():
                    item.future.set_exception(outcome)
        elif outcome is not None:
            offset = 0
            for item in live:
                end = offset + item.rows
                if not item.future.done():
                    item.future.set_result(tuple([array[offset:end] for array in outcome]))
                offset = end
        with self._cond:
            self._unanswered -= 1
        self.on_depth(depth)
        if stats is not None:
            # After the waiting handlers (their wake-ups were scheduled first): the batch's
            # metrics cost ~60 us, which no response should wait for.
            self._loop.call_soon(self.on_batch, stats)
