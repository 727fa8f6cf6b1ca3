"""The dynamic batcher with a fake predictor: merging, bounds, splitting, failures, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

import numpy as np
import pytest

from service.batching import Batcher, split_rows, take_batch
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull


class Fake:
    """Echoes row sums as 'probabilities'; records batch sizes; can block, fail or lie. `entered`
    is set once a batch has been taken (before the gate); with a `barrier`, each batch waits
    there for the others."""

    def __init__(self, delay=0.0, fail=False, short=False, barrier: threading.Barrier | None = None):
        self.delay, self.fail, self.short, self.barrier = delay, fail, short, barrier
        self.batches = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, x):
        self.entered.set()
        if self.barrier is not None:
            self.barrier.wait()
        self.gate.wait(5)
        self.batches.append(len(x))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        out = x.reshape(len(x), -1).sum(axis=1, keepdims=True)
        if self.short:
            out = out[:-1]
        return out, out[:, None, :]


def run(coro):
    return asyncio.run(coro)


async def started(**kw) -> Batcher:
    b = Batcher(**kw)
    b.start()
    return b


async def until(condition, timeout: float = 5.0) -> None:
    """Wait on the event loop until condition() holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.001)


def test_split_rows_and_take_batch():
    assert split_rows(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert split_rows(2, 8) == [(0, 2)]

    class I:
        def __init__(self, p, n, key=(1,)):
            self.predictor, self.x, self.rows, self.key = p, np.zeros((n, *key)), n, key

    a, b = object(), object()
    q = deque([I(a, 3), I(b, 1), I(a, 1, key=(7,)), I(a, 2), I(a, 4)])
    batch = take_batch(q, limit=5)
    assert [len(i.x) for i in batch] == [3, 2]  # same predictor and shape, within the limit
    assert [(len(i.x), i.key) for i in q] == [(1, (1,)), (1, (7,)), (4, (1,))]  # others keep their order
    assert q[0].predictor is b


def test_named_inputs_batch_by_the_shape_of_every_input_and_each_request_gets_its_rows():
    from service.batching import joined, rows_between, rows_of, shape_key

    a = {"tokens": np.array([[1, 2, 3]]), "text": np.array([b"x"], dtype=object)}
    b = {"tokens": np.array([[4, 5, 6], [7, 8, 9]]), "text": np.array([b"y", b"z"], dtype=object)}
    c = {"tokens": np.array([[1, 2]]), "text": np.array([b"w"], dtype=object)}
    assert rows_of(a) == 1 and rows_of(b) == 2 and rows_of(np.zeros((4, 2))) == 4
    assert shape_key(a) == shape_key(b) != shape_key(c)  # a variable length batches with its own length
    both = joined([a, b])
    assert both["tokens"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]] and both["text"].tolist() == [b"x", b"y", b"z"]
    assert joined([a]) is a
    assert rows_between(both, 1, 3)["text"].tolist() == [b"y", b"z"]

    class Echo:
        """Answers each batch with its token sums and its size: a request's answer must be its own."""

        def __init__(self):
            self.batches = []

        def predict(self, x):
            self.batches.append((rows_of(x), x["tokens"].shape[1]))
            return (x["tokens"].sum(axis=1), np.full(rows_of(x), rows_of(x)))

    async def go():
        batcher, echo = await started(max_batch_size=8), Echo()
        answers = await asyncio.gather(*(batcher.submit(echo, x) for x in (a, b, c, a)))
        await batcher.stop()
        return answers, echo.batches

    answers, batches = asyncio.run(go())
    assert [s.tolist() for s, _ in answers] == [[6], [15, 24], [3], [6]]
    # every row computed once, each batch of one token length (c's 2 never with the others' 3)
    assert sum(n for n, _ in batches) == 5
    assert sorted(length for _, length in batches).count(2) == 1


def test_lone_request_runs_at_once_and_gets_its_rows():
    async def go():
        b, fake = await started(max_batch_size=8), Fake()
        t = time.monotonic()
        avg, members = await b.submit(fake, np.array([[1.0, 2.0]]))
        elapsed = time.monotonic() - t
        await b.stop()
        return avg, members, elapsed

    avg, members, elapsed = run(go())
    assert avg.tolist() == [[3.0]] and members.shape == (1, 1, 1) and elapsed < 0.1


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows():
    async def go():
        b, fake = await started(max_batch_size=64), Fake()
        fake.gate.clear()  # hold the first batch so the others queue up behind it
        first = asyncio.ensure_future(b.submit(fake, np.array([[0.0]])))
        await until(fake.entered.is_set)  # the first batch is taken, and held
        rest = [asyncio.ensure_future(b.submit(fake, np.full((2, 1), float(i)))) for i in range(1, 11)]
        await asyncio.sleep(0)  # each submit runs up to its await: all ten are queued
        fake.gate.set()
        results = await asyncio.gather(first, *rest)
        await b.stop()
        return fake.batches, results

    batches, results = run(go())
    assert batches == [1, 20]
    for i, (avg, _) in enumerate(results[1:], start=1):
        assert avg.tolist() == [[float(i)], [float(i)]]


def test_the_next_batch_starts_without_waiting_for_the_event_loop():
    async def go():
        b, fake = await started(), Fake(delay=0.05)
        first = asyncio.ensure_future(b.submit(fake, np.zeros((1, 1))))
        await until(fake.entered.is_set)  # the first batch is computing
        second = asyncio.ensure_future(b.submit(fake, np.ones((1, 1))))
        await asyncio.sleep(0)  # the second request is queued
        # The loop is busy (held here, never awaiting): the thread must go on to the second
        # batch by itself.
        deadline = time.monotonic() + 5
        while len(fake.batches) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        computed_while_busy = list(fake.batches)
        results = await asyncio.gather(first, second)
        await b.stop()
        return computed_while_busy, results

    computed_while_busy, results = run(go())
    assert computed_while_busy == [1, 1]
    assert [avg.tolist() for avg, _ in results] == [[[0.0]], [[1.0]]]


def test_with_two_threads_two_batches_compute_side_by_side():
    async def go():
        # Two batches of one row, each waiting at the barrier for the other: computed one after
        # the other, the first would wait in vain (5 s) and fail.
        b, fake = await started(threads=2, max_batch_size=1), Fake(barrier=threading.Barrier(2, timeout=5))
        results = await asyncio.gather(*[b.submit(fake, np.full((1, 1), float(i))) for i in range(2)])
        await b.stop()
        return results

    results = run(go())
    assert [avg.tolist() for avg, _ in results] == [[[0.0]], [[1.0]]]


def test_large_requests_are_split_to_the_batch_limit():
    async def go():
        b, fake = await started(max_batch_size=4), Fake()
        avg, _ = await b.submit(fake, np.arange(10.0).reshape(10, 1))
        await b.stop()
        return fake.batches, avg

    batches, avg = run(go())
    assert max(batches) <= 4 and sum(batches) == 10
    assert avg.ravel().tolist() == list(np.arange(10.0))


def test_full_queue_refuses_at_once():
    async def go():
        b, fake = await started(max_batch_size=2, max_queue_rows=4), Fake()
        fake.gate.clear()
        held = [asyncio.ensure_future(b.submit(fake, np.zeros((2, 1))))]
        await until(fake.entered.is_set)  # that batch is running (blocked); now fill the queue
        held += [asyncio.ensure_future(b.submit(fake, np.zeros((2, 1)))) for _ in range(2)]
        await asyncio.sleep(0)  # each submit runs up to its await: 4 rows wait behind the running batch
        with pytest.raises(QueueFull, match="limit of 4"):
            await asyncio.wait_for(b.submit(fake, np.zeros((1, 1))), 5)
        with pytest.raises(QueueFull, match="queue is full"):
            b.check_admission()  # before any body is parsed
        # refused at once: the running batch is still held, so nothing had left the queue
        assert fake.batches == [] and not fake.gate.is_set()
        fake.gate.set()
        await asyncio.gather(*held)
        await b.stop()

    run(go())


def test_admission_is_open_below_the_bound_and_closed_when_draining():
    async def go():
        b = await started(max_queue_rows=4)
        b.check_admission()
        assert await b.drain(1.0)
        with pytest.raises(NotReady, match="shutting down"):
            b.check_admission()
        await b.stop()

    run(go())


def test_a_failed_batch_fails_every_waiter_and_the_batcher_goes_on():
    async def go():
        b, bad, good = await started(), Fake(fail=True), Fake()
        bad.gate.clear()
        waiters = [asyncio.ensure_future(b.submit(bad, np.zeros((1, 1)))) for _ in range(3)]
        await until(bad.entered.is_set)
        bad.gate.set()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        after = await b.submit(good, np.ones((1, 1)))
        await b.stop()
        return outcomes, after

    outcomes, after = run(go())
    assert all(isinstance(o, InferenceFailed) and "boom" in str(o) for o in outcomes)
    assert after[0].tolist() == [[1.0]]


def test_outputs_must_match_inputs_in_number():
    async def go():
        b = await started()
        try:
            await b.submit(Fake(short=True), np.zeros((3, 1)))
        finally:
            await b.stop()

    with pytest.raises(InferenceFailed, match="2 rows for a batch of 3"):
        run(go())


def test_expired_requests_are_not_computed():
    async def go():
        b, fake = await started(), Fake()
        fake.gate.clear()
        first = asyncio.ensure_future(b.submit(fake, np.zeros((1, 1))))
        await until(fake.entered.is_set)  # the first batch is taken, and held
        expires = time.monotonic() + 0.01
        late = asyncio.ensure_future(b.submit(fake, np.zeros((5, 1)), deadline=expires))
        await until(lambda: time.monotonic() > expires)  # its deadline passes while it waits
        fake.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await late
        await b.stop()
        return fake.batches

    assert run(go()) == [1]


def test_max_delay_waits_for_company_but_not_forever():
    async def go():
        b, fake = await started(max_batch_size=4, max_delay_seconds=0.05), Fake()
        t = time.monotonic()
        await b.submit(fake, np.zeros((1, 1)))
        lone = time.monotonic() - t
        full = await asyncio.gather(*[b.submit(fake, np.zeros((1, 1))) for _ in range(4)])
        await b.stop()
        return lone, fake.batches, full

    lone, batches, _ = run(go())
    assert 0.04 < lone < 0.5 and batches == [1, 4]


def test_inference_routes_match_templates_and_parameters():
    from service.edge.asgi import match_route

    assert match_route("/predict") == ("/predict", "predict", {})
    assert match_route("/v1/models/digits:predict") == ("/v1/models/{name}:predict", "tfs_predict", {"name": "digits"})
    assert match_route("/v1/models/digits/versions/3:predict")[2] == {"name": "digits", "version": "3"}
    assert match_route("/v2/models/digits/versions/12/infer")[1:] == ("v2_infer", {"name": "digits", "version": "12"})
    assert match_route("/v2/models/digits/ready") is None
    assert match_route("/predict/extra") is None


def test_deadline_header_and_default():
    from service.errors import InvalidInput
    from service.edge.asgi import deadline_from

    now = time.monotonic()
    assert deadline_from({}, 0) is None
    assert now + 0.09 < deadline_from({}, 100) < now + 0.2
    assert now + 0.009 < deadline_from({"x-request-timeout-ms": "10"}, 100) < now + 0.1
    for bad in ("soon", "0", "-5"):
        with pytest.raises(InvalidInput):
            deadline_from({"x-request-timeout-ms": bad}, 0)


def test_thread_plan_shares_the_cores_among_workers_and_batches():
    from service.engines.loader import thread_plan

    # (inference threads, intra-op, inter-op) from (settings..., workers, cores)
    assert thread_plan(0, 0, 0, workers=1, cores=2) == (1, 2, 1)  # one batch at a time gets both
    assert thread_plan(0, 0, 0, workers=1, cores=8) == (1, 8, 1)
    assert thread_plan(0, 0, 0, workers=2, cores=8) == (1, 4, 1)
    assert thread_plan(0, 0, 0, workers=2, cores=2) == (1, 1, 1)  # one core each
    assert thread_plan(0, 0, 0, workers=1, cores=1) == (1, 1, 1)
    assert thread_plan(2, 0, 0, workers=1, cores=2) == (2, 1, 2)  # two batches share the cores
    assert thread_plan(3, 4, 2, workers=1, cores=2) == (3, 4, 2)  # explicit values are kept
