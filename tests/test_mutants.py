"""Tests written for mutants that survived the mutation run (`make mutation`,
docs/development.md#mutation-testing): each pins a behaviour no other test checked."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.batching import split_rows
from service.errors import NotReady, PayloadTooLarge
from tests.test_batching import Fake, run, started


def test_split_rows_takes_a_limit_of_one_and_refuses_zero():
    assert split_rows(3, 1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="^limit must be at least 1$"):
        split_rows(3, 0)


def test_drain_of_an_idle_batcher_returns_true_at_once():
    async def main():
        b = await started()
        t0 = time.monotonic()
        assert await b.drain(2.0)
        assert time.monotonic() - t0 < 1.0

    run(main())


def test_drain_waits_for_the_batch_in_flight_and_returns_soon_after_it():
    async def main():
        b, fake = await started(), Fake()
        fake.gate.clear()
        task = asyncio.ensure_future(b.submit(fake, np.ones((1, 2), np.float32)))
        while not fake.entered.is_set():
            await asyncio.sleep(0.001)
        asyncio.get_running_loop().call_later(0.1, fake.gate.set)
        t0 = time.monotonic()
        assert await b.drain(5.0)
        assert time.monotonic() - t0 < 0.9  # polled often, not once a second
        await task

    run(main())


def test_drain_past_its_timeout_with_a_batch_in_flight_returns_false():
    async def main():
        b, fake = await started(), Fake()
        fake.gate.clear()
        task = asyncio.ensure_future(b.submit(fake, np.ones((1, 2), np.float32)))
        while not fake.entered.is_set():
            await asyncio.sleep(0.001)
        assert not await b.drain(0.1)  # the queue is empty, one batch unanswered
        fake.gate.set()
        await task

    run(main())


def test_a_draining_batcher_refuses_with_its_reason():
    async def main():
        b = await started()
        await b.drain(0.1)
        with pytest.raises(NotReady, match="^the service is shutting down$"):
            b.check_admission()
        with pytest.raises(NotReady, match="^the service is shutting down$"):
            await b.submit(Fake(), np.ones((1, 2), np.float32))

    run(main())


def test_a_request_of_exactly_the_queue_bound_is_served_and_one_more_row_is_refused():
    async def main():
        b, fake = await started(max_batch_size=4, max_queue_rows=8), Fake()
        x = np.arange(16, dtype=np.float32).reshape(8, 2)
        average, _ = await b.submit(fake, x)
        np.testing.assert_array_equal(average[:, 0], x.sum(axis=1))
        with pytest.raises(PayloadTooLarge, match="9 rows are more than the queue ever holds"):
            await b.submit(fake, np.ones((9, 2), np.float32))

    run(main())


def test_a_full_batch_leaves_at_once_whatever_max_delay_says():
    async def main():
        b, fake = await started(max_batch_size=2, max_delay_seconds=2.0), Fake()
        t0 = time.monotonic()
        await b.submit(fake, np.ones((2, 2), np.float32))
        assert time.monotonic() - t0 < 1.0

    run(main())
