"""Tests written for mutants that survived the mutation run (`make mutation`,
docs/development.md#mutation-testing): each pins a behaviour no other test checked."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher, split_rows, take_batch
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, PayloadTooLarge
from tests.test_batching import Fake, started


def run(coro, timeout: float = 10.0):
    """Run a coroutine, failing after `timeout` seconds: a mutant that loses a request fails
    the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


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
        task = await held_batch(b, fake)
        asyncio.get_running_loop().call_later(0.1, fake.gate.set)
        t0 = time.monotonic()
        assert await b.drain(5.0)
        assert time.monotonic() - t0 < 0.9  # polled often, not once a second
        await task

    run(main())


def test_drain_past_its_timeout_with_a_batch_in_flight_returns_false():
    async def main():
        b, fake = await started(), Fake()
        task = await held_batch(b, fake)
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


class Scored(Fake):
    """A predictor as the service has it: a name, class labels and a third output (scores)."""

    name = "digits"
    classes = ("a",)

    def predict(self, x):
        average, members = super().predict(x)
        return average, members, average * 10


async def held_batch(b, fake):
    """A first request whose batch is taken and held at the gate: what is submitted next queues."""
    fake.gate.clear()
    first = asyncio.ensure_future(b.submit(fake, np.zeros((1, 1), np.float32)))
    while not fake.entered.is_set():
        await asyncio.sleep(0.001)
    return first


def test_stop_fails_what_is_queued_closes_admission_and_ends_the_threads():
    async def main():
        before = set(threading.enumerate())
        b, fake = await started(), Fake()
        (thread,) = set(threading.enumerate()) - before
        first = await held_batch(b, fake)
        queued = asyncio.ensure_future(b.submit(fake, np.ones((1, 1), np.float32)))
        await asyncio.sleep(0)
        await b.stop()
        with pytest.raises(NotReady, match="^the service is shutting down$"):
            await asyncio.wait_for(queued, 2)
        with pytest.raises(NotReady, match="^the service is shutting down$"):
            b.check_admission()
        fake.gate.set()
        await first  # the batch in flight is still answered
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 2)
        assert not thread.is_alive(), "the inference thread did not end after stop()"

    run(main())


def test_a_cancelled_request_does_not_keep_the_rest_of_its_batch_from_an_answer():
    async def main():
        b, fake = await started(), Fake()
        first = await held_batch(b, fake)
        gone = asyncio.ensure_future(b.submit(fake, np.ones((1, 1), np.float32)))
        kept = asyncio.ensure_future(b.submit(fake, np.full((1, 1), 7.0, np.float32)))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        fake.gate.set()
        average, _ = await asyncio.wait_for(kept, 2)
        assert average.tolist() == [[7.0]]
        await first
        await b.stop()

    run(main())


def test_two_merged_requests_each_get_their_own_rows_of_three_outputs():
    async def main():
        seen = []
        b, fake = await started(on_batch=seen.append), Scored()
        first = await held_batch(b, fake)
        one = asyncio.ensure_future(b.submit(fake, np.array([[1.0], [2.0]], np.float32)))
        two = asyncio.ensure_future(b.submit(fake, np.array([[3.0]], np.float32)))
        await asyncio.sleep(0)
        fake.gate.set()
        (a1, m1, s1), (a2, m2, s2) = await asyncio.wait_for(asyncio.gather(one, two), 2)
        await first
        await asyncio.sleep(0.01)  # on_batch runs after the answers
        await b.stop()
        return fake.batches, (a1, m1, s1), (a2, m2, s2), seen

    batches, (a1, m1, s1), (a2, m2, s2), seen = run(main())
    assert batches == [1, 3]
    assert a1.tolist() == [[1.0], [2.0]] and s1.tolist() == [[10.0], [20.0]] and m1.shape == (2, 1, 1)
    assert a2.tolist() == [[3.0]] and s2.tolist() == [[30.0]] and m2.shape == (1, 1, 1)
    stats = seen[-1]
    assert (stats.rows, stats.requests) == (3, 2) and isinstance(stats.predictor, Scored)
    average, members, scores = stats.outputs
    assert average.tolist() == [[1.0], [2.0], [3.0]] and members.shape == (3, 1, 1)
    assert scores.tolist() == [[10.0], [20.0], [30.0]]
    assert len(stats.queue_wait) == 2 and all(0 <= w < 5 for w in stats.queue_wait)
    assert isinstance(stats.inference_seconds, float) and 0 <= stats.inference_seconds < 5


def test_the_metrics_read_a_batch_through_its_ensembles_answer_and_skip_other_predictors():
    from service.answer import Answer, Head, ScoreColumns
    from service.metrics import ServiceMetrics

    class Answering(Fake):
        """A predictor with an `answer`, as an ensemble has: its two outputs named as one head."""

        def predict(self, x):
            return np.hstack([x, 1 - x]), np.stack([np.hstack([x, 1 - x])] * 2, axis=1), np.zeros((len(x), 4))

        def answer(self, outputs):
            combined, members, scores = outputs
            head = Head("probabilities", "classification", ("a", "b"), combined, members, ScoreColumns(scores))
            return Answer("digits", 1, ("m0", "m1"), {head.name: head})

    async def main(fake):
        seen = []
        b = await started(on_batch=seen.append)
        await b.submit(fake, np.array([[0.9], [0.2]], np.float32))
        await asyncio.sleep(0.01)
        await b.stop()
        return seen

    metrics = ServiceMetrics()
    for fake in (Fake(), Answering()):
        (stats,) = run(main(fake))
        assert (stats.rows, stats.requests) == (2, 1) and stats.predictor is fake
        metrics.observe_batch(stats)
    text = metrics.exposition().decode()
    assert "ensemble_batch_size_rows_count 2.0" in text  # both batches: sizes and times
    assert 'ensemble_member_disagreement_ratio_count{model="digits"} 2.0' in text  # the answering one only
    assert 'ensemble_predicted_class_total{class="a",model="digits"} 1.0' in text
    assert 'ensemble_predicted_class_total{class="b",model="digits"} 1.0' in text


def test_an_inference_failed_from_the_predictor_keeps_its_message_and_is_logged(caplog):
    async def main():
        b = await started()
        try:
            await b.submit(Fake(short=True), np.zeros((2, 1), np.float32))
        finally:
            await b.stop()

    with pytest.raises(Exception, match="^the ensemble returned 1 rows for a batch of 2$"):
        run(main())
    assert "batch of 2 rows failed: the ensemble returned 1 rows for a batch of 2" in [
        r.getMessage() for r in caplog.records]


def test_take_batch_counts_every_row_it_takes():
    from collections import deque
    from types import SimpleNamespace

    p = object()
    q = deque(SimpleNamespace(predictor=p, x=np.zeros((2, 1)), rows=2, key=(1,)) for _ in range(3))
    assert len(take_batch(q, limit=5)) == 2 and len(q) == 1


def test_an_expired_request_says_how_long_it_waited_and_the_batcher_drains_after_it():
    async def main():
        depths = []
        b, fake = await started(on_depth=depths.append), Fake()
        first = await held_batch(b, fake)
        expires = time.monotonic() + 0.01
        late = asyncio.ensure_future(b.submit(fake, np.zeros((1, 1), np.float32), deadline=expires))
        while time.monotonic() <= expires:
            await asyncio.sleep(0.005)
        fake.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match=r"^the request's deadline passed after 0\.\d{3} s in the "
                                                    r"queue; it was not computed$"):
            await late
        assert await b.drain(1.0)  # the batch of expired requests was answered, too
        await b.stop()
        return depths

    assert run(main()) == [0, 0]  # what each batch left queued


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"max_queue_rows": 0}, {"max_delay_seconds": -0.1},
                                 {"threads": 0}])
def test_each_batcher_bound_is_checked_on_its_own(bad):
    with pytest.raises(ValueError, match=r"^max_batch_size, max_queue_rows and threads must be >= 1, "
                                         r"max_delay_seconds >= 0$"):
        Batcher(**bad)
    Batcher(max_batch_size=1, max_queue_rows=1, max_delay_seconds=0, threads=1)  # the least that works


# -- the codecs -------------------------------------------------------------------------------

def test_a_value_below_an_integer_range_is_the_one_named():
    from service.protocols.arrays import check_range
    from service.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"^'instances' holds -1 outside the range of input dtype uint8 \[0, 255\]$"):
        check_range(np.array([-1, 300]), np.dtype("uint8"), "instances")
    with pytest.raises(InvalidInput, match=r"^'instances' holds 300 outside"):
        check_range(np.array([0, 300]), np.dtype("uint8"), "instances")
    check_range(np.array([0, 255]), np.dtype("uint8"), "instances")  # both ends are in range


def test_byte_strings_and_other_kinds_are_named_in_the_refusal():
    from service.protocols.arrays import numeric
    from service.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"^'x' must hold numbers only; found strings$"):
        numeric(np.array([b"a"]), "x")
    with pytest.raises(InvalidInput, match=r"^'x' must hold numbers only; found values of type complex128$"):
        numeric([1j], "x")


def test_columnar_inputs_name_their_field_in_every_refusal():
    from service.protocols.predict import columnar_inputs
    from service.errors import InvalidInput
    from contract.manifest import InputSpec

    spec = InputSpec(shape=(2,))
    with pytest.raises(InvalidInput, match=r"^'inputs' names 2 tensors; this model takes exactly one$"):
        columnar_inputs({"a": [[1, 2]], "b": [[1, 2]]}, spec, 8)
    with pytest.raises(InvalidInput, match=r"^'inputs' is empty"):
        columnar_inputs({"a": []}, spec, 8)
    assert columnar_inputs({"a": [[1, 2]]}, spec, 8).tolist() == [[1.0, 2.0]]


def test_v2_model_metadata_in_full():
    from types import SimpleNamespace

    from service.protocols.oip import model_metadata
    from contract.manifest import InputSpec
    from contract.scores import SCORES

    manifest = SimpleNamespace(format_version=1, members=[SimpleNamespace(name="m0"), SimpleNamespace(name="m1")],
                               temperature=1.5, abstention=None)
    ensemble = SimpleNamespace(name="digits", version=3, input_spec=InputSpec(shape=(4,), dtype="uint8"),
                               classes=("a", "b", "c"), manifest=manifest)
    assert model_metadata(ensemble) == {
        "name": "digits", "versions": ["3"], "platform": "tensorflow_savedmodel_ensemble",
        "inputs": [{"name": "instances", "datatype": "UINT8", "shape": [-1, 4]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "members", "datatype": "FP32", "shape": [-1, 2, 3]},
                    *({"name": s, "datatype": "FP32", "shape": [-1]} for s in SCORES)],
        "parameters": {"classes": ["a", "b", "c"], "members": ["m0", "m1"], "temperature": 1.5},
    }


def test_v2_model_metadata_with_an_abstention_threshold():
    from types import SimpleNamespace

    from service.protocols.oip import model_metadata
    from contract.manifest import Abstention, InputSpec

    abstention = Abstention(score="entropy", threshold=0.5, target_error=0.05, coverage=0.9)
    manifest = SimpleNamespace(format_version=1, members=[SimpleNamespace(name="m0")], temperature=1.0, abstention=abstention)
    ensemble = SimpleNamespace(name="digits", version=1, input_spec=InputSpec(shape=(2,)), classes=("a",),
                               manifest=manifest)
    meta = model_metadata(ensemble)
    assert meta["outputs"][-1] == {"name": "abstain", "datatype": "BOOL", "shape": [-1]}
    assert meta["parameters"]["abstention"] == abstention.model_dump()


def test_v2_server_metadata_and_readiness_replies():
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.edge.v2 import register

    for ready, status in ((True, 200), (False, 503)):
        app = FastAPI()
        register(app, SimpleNamespace(manager=SimpleNamespace(readiness=lambda ready=ready: (ready, []))))
        with TestClient(app) as client:
            reply = client.get("/v2")
            assert reply.status_code == 200
            assert reply.json() == {"name": "ensemble-serving", "version": "0.1.0",
                                    "extensions": ["binary_tensor_data"]}
            reply = client.get("/v2/health/ready")
            assert (reply.status_code, reply.json()) == (status, {"ready": ready})


def test_members_by_name_gives_each_member_its_rows():
    from service.answer import Head

    probs = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (rows, members, classes)
    head = Head("probabilities", "classification", tuple("wxyz"), probs[:, 0], probs, {})
    by_name = head.members_by_name(["a", "b", "c"])
    assert list(by_name) == ["a", "b", "c"]
    for i, name in enumerate("abc"):
        np.testing.assert_array_equal(by_name[name], probs[:, i, :])
        assert by_name[name].flags.c_contiguous


def test_a_split_request_keeps_its_deadline():
    async def main():
        b, fake = await started(max_batch_size=2), Fake()
        first = await held_batch(b, fake)
        expires = time.monotonic() + 0.01
        late = asyncio.ensure_future(b.submit(fake, np.zeros((5, 1), np.float32), deadline=expires))
        while time.monotonic() <= expires:
            await asyncio.sleep(0.005)
        fake.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match="it was not computed"):
            await late
        await b.stop()
        return fake.batches

    assert run(main()) == [1]  # none of the three chunks was computed


def test_a_bug_in_the_batcher_fails_its_batch_with_the_exception_type_and_the_thread_goes_on(caplog, monkeypatch):
    import service.batching as batching

    real = batching.BatchStats

    def broken(rows, *args):  # the batcher's own code failing after predict, on one batch
        if rows == 3:
            raise RuntimeError("planted")
        return real(rows, *args)

    monkeypatch.setattr(batching, "BatchStats", broken)

    async def main():
        b, fake = await started(), Fake()
        with pytest.raises(InferenceFailed, match=r"^internal error in the batcher: RuntimeError$"):
            await b.submit(fake, np.ones((3, 1), np.float32))
        average, _ = await b.submit(fake, np.ones((1, 2), np.float32))
        await b.stop()
        return average

    assert run(main()).tolist() == [[2.0]]
    assert "the batch of 1 requests could not be computed" in [r.getMessage() for r in caplog.records]


def test_v2_check_input_messages_and_bounds():
    from service.protocols.oip import DATATYPES, check_input
    from service.errors import InvalidInput
    from contract.manifest import InputSpec

    spec = InputSpec(shape=(2,))
    long_name = "X" * 60
    with pytest.raises(InvalidInput, match=rf"^inputs\[0\]\.datatype '{'X' * 40}' is not one of FP32, FP64, "):
        check_input([1, 2], long_name, spec, 4, DATATYPES)
    with pytest.raises(InvalidInput, match=r"^inputs\[0\]\.shape must be \[rows, 2\], got \[-1, 2\]$"):
        check_input([-1, 2], "FP32", spec, 4, DATATYPES)  # right rank and dims, negative rows
    with pytest.raises(InvalidInput, match=r"^inputs\[0\]\.shape must be \[rows, 2\], got \[1, 3\]$"):
        check_input([1, 3], "FP32", spec, 4, DATATYPES)  # right rank, wrong dims
    with pytest.raises(InvalidInput, match=r"got \[1, 1, 1, 1, 1, 1, 1, 1, 1, 1\]$"):
        check_input([1] * 12, "FP32", spec, 4, DATATYPES)  # the shape quoted is cut at ten
    with pytest.raises(PayloadTooLarge, match=r"^inputs\[0\] has 5 rows; at most 4 are allowed per request$"):
        check_input([5, 2], "FP32", spec, 4, DATATYPES)
    dtype, count = check_input([4, 2], "FP32", spec, 4, DATATYPES)  # exactly the row limit
    assert (dtype, count) == (np.dtype("<f4"), 8)


def test_instances_at_the_row_limit_are_taken_and_refusals_name_the_field():
    from service.protocols.predict import instances_to_array
    from service.errors import InvalidInput
    from contract.manifest import InputSpec

    spec = InputSpec(shape=(2,), dtype="uint8")
    assert instances_to_array([[1, 2]] * 3, spec, 3).shape == (3, 2)
    with pytest.raises(InvalidInput, match=r"^'rows' is ragged or mixes types: it must be nested lists of numbers "
                                           r"of shape \[2\]$"):
        instances_to_array([[1, 2], [1]], spec, 3, field="rows")
    with pytest.raises(InvalidInput, match=r"^'rows' holds 300 outside the range"):
        instances_to_array([[1, 300]], spec, 3, field="rows")


def test_v2_wanted_outputs_default_and_binary_and_their_refusals():
    from service.protocols.oip import OUTPUTS, wanted_outputs
    from service.errors import InvalidInput

    assert wanted_outputs({}) == (["probabilities"], set())
    assert wanted_outputs({"parameters": {"binary_data_output": True}}) == (["probabilities"], {"probabilities"})
    with pytest.raises(InvalidInput, match=r"""^'outputs' must be a list of \{"name": "..."\}$"""):
        wanted_outputs({"outputs": [{"name": 1}]})
    with pytest.raises(InvalidInput, match=rf"^unknown output '{'y' * 100}'; this model has {', '.join(OUTPUTS)}$"):
        wanted_outputs({"outputs": [{"name": "y" * 150}]})


def test_v2_input_array_refusals_say_what_to_send():
    from service.protocols.oip import input_array
    from service.errors import InvalidInput
    from contract.manifest import InputSpec

    spec = InputSpec(shape=(2,))
    with pytest.raises(InvalidInput, match=r"""^missing field 'inputs': send \[\{"name", "shape", "datatype", "data"\}\]$"""):
        input_array({}, b"", spec, 4)
    with pytest.raises(InvalidInput, match=r"^'inputs' holds 1 tensors; this model takes exactly one$"):
        input_array({"inputs": [1]}, b"", spec, 4)  # one item, not an object
    with pytest.raises(InvalidInput, match=r"^'inputs' holds 2 tensors; this model takes exactly one$"):
        input_array({"inputs": [{}, {}]}, b"", spec, 4)
    with pytest.raises(InvalidInput, match=r"^inputs\[0\]\.shape must be a list of non-negative integers$"):
        input_array({"inputs": [{"name": "instances", "shape": [-1, 2], "datatype": "FP32", "data": []}]},
                    b"", spec, 4)


def test_three_merged_requests_of_three_outputs_each_get_their_own_rows():
    async def main():
        b, fake = await started(), Scored()
        first = await held_batch(b, fake)
        sizes = (1, 2, 1)
        xs = [np.arange(i * 10, i * 10 + n, dtype=np.float32).reshape(n, 1) for i, n in enumerate(sizes)]
        waiting = [asyncio.ensure_future(b.submit(fake, x)) for x in xs]
        await asyncio.sleep(0)
        fake.gate.set()
        answers = await asyncio.gather(*waiting)
        await first
        await b.stop()
        return fake.batches, xs, answers

    batches, xs, answers = run(main())
    assert batches == [1, 4]
    for x, (average, members, scores) in zip(xs, answers):
        assert average.tolist() == x.tolist() and scores.tolist() == (x * 10).tolist() and len(members) == len(x)


def ensemble_double(version: int = 1, abstention=None):
    """An ensemble as the codecs read it: name, version, input spec, classes and manifest."""
    from types import SimpleNamespace

    from contract.manifest import InputSpec

    manifest = SimpleNamespace(members=[SimpleNamespace(name="m0")], temperature=1.0, abstention=abstention,
                               format_version=1)
    return SimpleNamespace(name="digits", version=version, input_spec=InputSpec(shape=(2,)), classes=("a",),
                           manifest=manifest)


def answer_double(combined, members, scores, version: int = 1, classes=("a",), abstains: bool = False):
    """The answer of `ensemble_double`'s version (service.answer) with these arrays."""
    from service.answer import Answer, Head, ScoreColumns

    head = Head("probabilities", "classification", classes, combined, members, ScoreColumns(scores),
                scores[:, 3] > 0 if abstains else None)
    return Answer("digits", version, ("m0",), {head.name: head})


def test_ragged_rows_without_a_shape_get_no_shape_hint():
    from service.protocols.arrays import numeric
    from service.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"^'x' is ragged or mixes types: it must be nested lists of numbers$"):
        numeric([[1], [1, 2]], "x")


def test_v2_binary_body_header_length_checks():
    from service.protocols.oip import split_binary_body
    from service.errors import MalformedRequest

    assert split_binary_body(b"abc", None) == (b"abc", b"")
    assert split_binary_body(b"abc", "3") == (b"abc", b"")  # all of it JSON
    assert split_binary_body(b"abc", "1") == (b"a", b"bc")
    with pytest.raises(MalformedRequest, match=r"^Inference-Header-Content-Length must be a byte count, got '1a'$"):
        split_binary_body(b"abc", "1a")
    with pytest.raises(MalformedRequest, match=r"^Inference-Header-Content-Length is 1{20}\.\.\. but the body"):
        split_binary_body(b"0123456789", "1" * 25)
    with pytest.raises(MalformedRequest, match=r"^Inference-Header-Content-Length is 12 but the body has only 10 bytes$"):
        split_binary_body(b"0123456789", "12")


def test_v2_parameters_that_are_not_an_object_are_named():
    from service.protocols.oip import parameters, wanted_outputs
    from service.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"^inputs\[0\]\.parameters must be a JSON object, got a JSON int$"):
        parameters({"parameters": 3}, "inputs[0].")
    with pytest.raises(InvalidInput, match=r"^parameters must be a JSON object, got a JSON list$"):
        wanted_outputs({"parameters": []})


def test_v2_input_array_data_and_binary_refusals_name_the_input():
    from service.protocols.oip import input_array
    from service.errors import InvalidInput
    from contract.manifest import InputSpec

    spec = InputSpec(shape=(2,))
    tensor = {"name": "instances", "shape": [1, 2], "datatype": "FP32"}
    with pytest.raises(InvalidInput, match=r"^the binary part of the body has 4 bytes; inputs\[0\] declares 8$"):
        input_array({"inputs": [dict(tensor, parameters={"binary_data_size": 8})]}, b"abcd", spec, 4)
    with pytest.raises(InvalidInput, match=r"^inputs\[0\] has neither 'data' nor parameters\.binary_data_size$"):
        input_array({"inputs": [tensor]}, b"", spec, 4)
    with pytest.raises(InvalidInput, match=r"^'inputs\[0\]\.data' must hold numbers only; found strings$"):
        input_array({"inputs": [dict(tensor, data=["a", "b"])]}, b"", spec, 4)
    with pytest.raises(InvalidInput, match=r"^'inputs\[0\]' holds a non-finite number in row 0"):
        input_array({"inputs": [dict(tensor, data=[float("nan"), 1.0])]}, b"", spec, 4)


def test_v2_outputs_are_little_endian_and_flat():
    import json

    from service.protocols.oip import encode_outputs

    big = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=">f4")
    body, header_length = encode_outputs("digits", 1, None, {"probabilities": big}, {"probabilities"})
    assert body[header_length:] == np.array([1.0, 2.0, 3.0, 4.0], dtype="<f4").tobytes()
    body, header_length = encode_outputs("digits", 1, "r1", {"probabilities": big}, set())
    assert header_length is None
    assert json.loads(body)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


def test_asking_for_abstain_without_a_threshold_says_what_to_ask_instead():
    from service.protocols.oip import output
    from service.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"^digits version 1 has no abstention threshold \(its manifest has none\); "
                                           r"ask for the uncertainty scores instead$"):
        output("abstain", answer_double(np.zeros((1, 2), np.float32), np.zeros((1, 1, 2), np.float32),
                                        np.zeros((1, 4), np.float32)))


def test_v2_model_metadata_of_a_version_is_that_versions():
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.edge.v2 import register

    versions = {None: ensemble_double(1), 2: ensemble_double(2)}
    app = FastAPI()
    register(app, SimpleNamespace(manager=SimpleNamespace(get=lambda name, version=None: versions[version])))
    with TestClient(app) as client:
        assert client.get("/v2/models/digits/versions/2").json()["versions"] == ["2"]
        assert client.get("/v2/models/digits").json()["versions"] == ["1"]


def rows_reply(body: bytes, query: dict[str, str]) -> dict:
    """The JSON of `POST /predict`'s handler for `body`, over a one-member double of a served
    ensemble whose answer is fixed."""
    import json
    from types import SimpleNamespace

    from service.edge.rest import _rows

    average = np.array([[0.2, 0.8]], np.float32)
    members = average[:, None, :]
    scores = np.zeros((1, 4), np.float32)

    async def infer(ensemble, x, deadline):
        assert x.tolist() == [[1.0, 2.0]] and deadline == 7.0
        return answer_double(average, members, scores, version=3, classes=("a", "b"))

    ensemble = ensemble_double(version=3)
    plane = SimpleNamespace(settings=SimpleNamespace(max_rows_per_request=4, request_timeout_ms=5),
                            json_value_limit=lambda ensemble: 100, infer=infer)
    call = SimpleNamespace(body=body, query=query, deadline=lambda default_ms: 7.0)
    reply = asyncio.run(_rows(call, plane, ensemble))
    assert reply.status == 200
    return json.loads(reply.body)


def test_the_row_reply_names_labels_classes_model_and_members_on_either_decoder():
    for body in (b'{"instances": [[1, 2]]}', b'{"instances": [[1, 2]], "signature_name": "x"}'):
        reply = rows_reply(body, {"members": "TRUE"})
        assert np.allclose(reply["predictions"], [[0.2, 0.8]]) and "outputs" not in reply
        assert reply["labels"] == ["b"] and reply["classes"] == ["a", "b"]
        assert reply["model"] == {"name": "digits", "version": 3}
        assert list(reply["members"]) == ["m0"] and np.allclose(reply["members"]["m0"], [[0.2, 0.8]])
        assert reply["disagreement"] == [0.0]
    assert "members" not in rows_reply(b'{"instances": [[1, 2]]}', {})
    assert "outputs" in rows_reply(b'{"inputs": [[1, 2]], "signature_name": "x"}', {})


def test_v2_infer_replies_200_as_json_or_binary_with_its_header_length():
    from types import SimpleNamespace

    from service.edge.v2 import v2_infer

    ensemble = ensemble_double()

    async def infer(ensemble, x, deadline):
        return answer_double(np.array([[0.2, 0.8]], np.float32), np.zeros((1, 1, 2), np.float32),
                             np.zeros((1, 4), np.float32))

    server = SimpleNamespace(ensemble=lambda name, version: ensemble, infer=infer, json_value_limit=lambda e: 100,
                             settings=SimpleNamespace(max_rows_per_request=4, request_timeout_ms=5))
    request = {"inputs": [{"name": "instances", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    import json
    for params, binary in (({}, False), ({"binary_data_output": True}, True)):
        body = json.dumps(dict(request, parameters=params)).encode()
        call = SimpleNamespace(params={"name": "digits"}, body=body, headers={}, deadline=lambda default_ms: None)
        reply = asyncio.run(v2_infer(call, server))
        assert reply.status == 200
        if binary:
            assert reply.content_type == b"application/octet-stream"
            (name, value), = reply.headers
            assert name == b"inference-header-content-length" and int(value) < len(reply.body)
        else:
            assert reply.content_type == b"application/json" and reply.headers == []


def test_v2_routes_are_registered_on_their_paths():
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.edge.v2 import register

    app = FastAPI()
    register(app, SimpleNamespace(manager=SimpleNamespace(readiness=lambda: (True, []),
                                                          get=lambda name, version=None: ensemble_double())))
    with TestClient(app) as client:
        assert client.get("/v2").json()["name"] == "ensemble-serving"
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2/models/digits").json()["name"] == "digits"
        assert client.get("/v2/models/digits/versions/1").json()["versions"] == ["1"]
        assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
        assert client.get("/v2/models/digits/versions/1/ready").json() == {"name": "digits", "ready": True}


def test_a_json_body_of_exactly_the_value_limit_is_parsed_and_an_empty_one_says_what_to_send():
    from service.protocols.arrays import parse_json_object
    from service.dataplane.limits import json_values
    from service.errors import MalformedRequest

    body = b'{"instances": [[1, 2]]}'
    assert parse_json_object(body, json_values(body)) == {"instances": [[1, 2]]}
    with pytest.raises(PayloadTooLarge):
        parse_json_object(body, json_values(body) - 1)
    with pytest.raises(MalformedRequest, match=r'^request body is empty; send a JSON object like \{"instances": \[\.\.\.\]\}$'):
        parse_json_object(b"", 10)


def test_the_row_decoder_refuses_a_byte_after_the_object_names_its_field_and_prefers_instances():
    from service.protocols.predict import decode
    from service.errors import InvalidInput, MalformedRequest
    from contract.manifest import InputSpec

    spec = InputSpec(shape=(2,))
    with pytest.raises(MalformedRequest):
        decode(b'{"instances": [[1, 2]]}x', spec, 4, 100)
    with pytest.raises(InvalidInput, match=r"^'instances' holds a non-finite number in instance 0"):
        decode(b'{"instances": [[1e39, 1]]}', spec, 4, 100)
    with pytest.raises(InvalidInput, match=r"^missing field 'instances'"):
        decode(b'{"x": 1}', spec, 4, 100)
    x, columnar = decode(b'{"instances": [[1, 2]], "inputs": [[3, 4]]}', spec, 4, 100)
    assert x.tolist() == [[1.0, 2.0]] and not columnar


# contract/ (the `repository` group; service/repository.py when it ran)


def test_failure_of_names_a_repository_error_by_its_message_and_anything_else_by_its_type():
    from contract.manifest import ManifestError, failure_of

    assert failure_of(ManifestError("no manifest")) == ("no manifest", "manifest")
    assert failure_of(ValueError("bad shape")) == ("ValueError: bad shape", "load")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_first_nonfinite_row_is_the_index_of_the_first_bad_row(dtype):
    from contract.manifest import first_nonfinite_row

    x = np.ones((4, 2, 2), dtype)
    assert first_nonfinite_row(x) is None
    x[2, 1, 0] = np.nan
    x[3, 0, 1] = np.inf
    assert first_nonfinite_row(x) == 2
    assert first_nonfinite_row(np.ones((3, 2), np.int64)) is None


def test_uniform_weights_of_one_member_and_the_refusal_of_none():
    from contract.manifest import uniform_weights

    assert uniform_weights(1) == [1.0]
    with pytest.raises(ValueError, match="^an ensemble needs at least one member$"):
        uniform_weights(0)


def test_a_verified_copy_is_private_and_holds_every_file_of_a_member(tmp_path):
    import os
    import stat
    from datetime import datetime, timezone

    from contract.integrity import file_digests, verify_checksums
    from contract.manifest import InputSpec, Manifest, MemberEntry, OutputSpec

    vdir = tmp_path / "digits" / "1"
    (vdir / "members" / "m").mkdir(parents=True)
    (vdir / "members" / "m" / "a.pb").write_bytes(b"a")
    (vdir / "members" / "m" / "b.pb").write_bytes(b"b")
    m = Manifest(name="digits", version=1, created=datetime.now(timezone.utc), input=InputSpec(shape=(2,)),
                 output=OutputSpec(classes=("a", "b")),
                 members=(MemberEntry(name="m", path="members/m", kind="tuned", weight=1.0,
                                      files=file_digests(vdir / "members" / "m")),))
    old = os.umask(0o022)
    try:
        verify_checksums(vdir, m, copy_into=tmp_path / "copy")
    finally:
        os.umask(old)
    member = tmp_path / "copy" / "members" / "m"
    assert sorted(p.name for p in member.iterdir()) == ["a.pb", "b.pb"]
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o700
    assert stat.S_IMODE(member.stat().st_mode) == 0o700
    assert {stat.S_IMODE((member / f).stat().st_mode) for f in ("a.pb", "b.pb")} == {0o600}


def test_a_checked_copy_is_never_written_over_an_existing_file_or_through_a_link(tmp_path):
    from contract.integrity import _checked_digest

    (tmp_path / "src").write_bytes(b"new")
    (tmp_path / "there").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        _checked_digest(tmp_path / "src", tmp_path / "there", "here")
    assert (tmp_path / "there").read_bytes() == b"old"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        _checked_digest(tmp_path / "src", tmp_path / "link", "here")
    assert not (tmp_path / "elsewhere").exists()


def test_the_largest_version_number_is_a_version_folder():
    from contract.layout import MAX_VERSION, is_version_folder

    assert is_version_folder(str(MAX_VERSION))
    assert not is_version_folder(str(MAX_VERSION + 1))


def test_symbolic_links_in_the_repository_kept_inside_it_skipped_when_leading_out_or_nowhere(tmp_path):
    from contract.layout import Skipped, scan_model_entries, scan_names_entries

    root = tmp_path / "repo"
    (root / "digits" / "1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "alias").symlink_to(root / "digits")
    (root / "away").symlink_to(tmp_path / "outside")
    (root / "gone").symlink_to(root / "missing")  # dangling, though it would be inside
    (root / "Odd!").mkdir()
    names, skipped = scan_names_entries(root)
    assert names == ["alias", "digits"]
    out = "a symbolic link leading out of the repository"
    assert sorted(skipped, key=lambda s: s.entry) == [
        Skipped("Odd!", r"not an ensemble name (^[a-z0-9][a-z0-9_-]{0,63}$)"),
        Skipped("away", out), Skipped("gone", out)]
    (root / "digits" / "2").symlink_to(root / "digits" / "none")
    (root / "digits" / "3").symlink_to(root / "digits" / "1")
    versions, skipped = scan_model_entries(root, "digits")
    assert [v.version for v in versions] == [1, 3] and skipped == [Skipped("2", out)]


def one_member_version(root, files=(("saved_model.pb", b"weights"),)):
    """A version folder digits/1 whose one member `m` holds `files`, and its manifest."""
    from datetime import datetime, timezone

    from contract.integrity import file_digests
    from contract.manifest import InputSpec, Manifest, MemberEntry, OutputSpec

    vdir = root / "digits" / "1"
    (vdir / "members" / "m").mkdir(parents=True)
    for name, data in files:
        (vdir / "members" / "m" / name).write_bytes(data)
    return vdir, Manifest(name="digits", version=1, created=datetime.now(timezone.utc),
                          input=InputSpec(shape=(2,)), output=OutputSpec(classes=("a", "b")),
                          members=(MemberEntry(name="m", path="members/m", kind="tuned", weight=1.0,
                                               files=file_digests(vdir / "members" / "m")),))


def test_a_member_folder_replaced_by_a_link_or_removed_is_refused_by_name(tmp_path):
    import shutil

    from contract.integrity import ChecksumError, verify_checksums

    vdir, m = one_member_version(tmp_path)
    (vdir / "members" / "m").rename(tmp_path / "real")
    (vdir / "members" / "m").symlink_to(tmp_path / "real")
    message = r"^member m: folder members/m is missing \(or a symbolic link\)$"
    with pytest.raises(ChecksumError, match=message):
        verify_checksums(vdir, m)
    (vdir / "members" / "m").unlink()
    with pytest.raises(ChecksumError, match=message):
        verify_checksums(vdir, m)
    shutil.copytree(tmp_path / "real", vdir / "members" / "m")
    (vdir / "members" / "m" / "extra").symlink_to(tmp_path / "real" / "saved_model.pb")
    with pytest.raises(ChecksumError, match=r"^member m: members/m/extra is a symbolic link; a version holds"):
        verify_checksums(vdir, m)


def test_sha256_file_refuses_a_pipe_and_a_link_without_waiting_or_following(tmp_path):
    import errno
    import os

    from contract.integrity import sha256_file

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError) as raised:
        sha256_file(tmp_path / "pipe")
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        errno.EINVAL, "not a regular file", str(tmp_path / "pipe"))
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with pytest.raises(OSError) as raised:
        sha256_file(tmp_path / "link")
    assert raised.value.errno == errno.ELOOP


def test_read_manifest_refuses_a_link_or_a_folder_and_names_each_schema_problem(tmp_path):
    import json

    from contract.manifest import ManifestError, read_manifest

    vdir, m = one_member_version(tmp_path)
    (tmp_path / "elsewhere.json").write_text(m.model_dump_json())
    (vdir / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ManifestError, match=r"manifest.json is not a regular file$"):
        read_manifest(vdir)
    (vdir / "manifest.json").unlink()
    (vdir / "manifest.json").mkdir()
    with pytest.raises(ManifestError, match=r"manifest.json is not a regular file$"):
        read_manifest(vdir)
    (vdir / "manifest.json").rmdir()
    raw = json.loads(m.model_dump_json())
    raw["input"]["shape"] = []
    raw["members"][0]["weight"] = 0.5
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as raised:
        read_manifest(vdir)
    assert str(raised.value) == (
        f"{vdir / 'manifest.json'} does not follow the schema: input.shape: "
        "Tuple should have at least 1 item after validation, not 0")
    raw["input"]["shape"] = [2]
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"schema: \(root\): Value error, member weights must sum to 1"):
        read_manifest(vdir)
    (vdir / "manifest.json").write_text('{"name": "digits", "version": 1}')
    with pytest.raises(ManifestError, match=r"schema: created: Field required; input: Field required; "):
        read_manifest(vdir)
    (vdir / "manifest.json").write_text(m.model_dump_json())
    assert read_manifest(vdir) == m
    (tmp_path / "digits").rename(tmp_path / "other")
    with pytest.raises(ManifestError, match="describes digits/1 but sits in other/1$"):
        read_manifest(tmp_path / "other" / "1")


def test_checksum_refusals_name_the_first_extra_file_both_digests_and_anything_not_a_file(tmp_path):
    import os

    from contract.integrity import ChecksumError, verify_checksums

    vdir, m = one_member_version(tmp_path)
    member = vdir / "members" / "m"
    for extra in ("y", "x"):
        (member / extra).write_bytes(b"")
    with pytest.raises(ChecksumError, match=r"^member m: file members/m/x is not in the manifest$"):
        verify_checksums(vdir, m)
    for extra in ("y", "x"):
        (member / extra).unlink()
    (member / "saved_model.pb").write_bytes(b"changed")
    expected, actual = m.members[0].files["saved_model.pb"], __import__("hashlib").sha256(b"changed").hexdigest()
    with pytest.raises(ChecksumError) as raised:
        verify_checksums(vdir, m)
    assert str(raised.value) == (f"member m: checksum mismatch for members/m/saved_model.pb "
                                 f"(manifest {expected[:12]}..., file {actual[:12]}...)")
    (member / "saved_model.pb").write_bytes(b"weights")
    os.mkfifo(member / "p")
    with pytest.raises(ChecksumError, match=r"^member m: members/m/p is not a regular file$"):
        verify_checksums(vdir, m)
    (member / "p").unlink()
    verify_checksums(vdir, m, copy_into=tmp_path / "copy")
    assert (tmp_path / "copy" / "manifest.json").read_text() == m.model_dump_json(indent=2) + "\n"


def test_ensemble_names_are_checked_against_the_pattern():
    from contract.layout import is_valid_name

    assert is_valid_name("digits") and is_valid_name("a" * 64)
    assert not is_valid_name("Digits") and not is_valid_name("a" * 65) and not is_valid_name("")


def test_scanning_skips_files_hidden_entries_odd_names_and_unreadable_folders_with_their_reasons(tmp_path):
    import os

    from contract.layout import MAX_VERSION, Skipped, scan_model, scan_model_entries, scan_names_entries

    root = tmp_path / "repo"
    versions = [1, 2, 3, 5, 8, 13]
    for v in versions:
        (root / "digits" / str(v)).mkdir(parents=True)
    (root / "digits" / "2" / "manifest.json").write_text("{}")
    for hidden in (".staging-1", ".a", ".z"):
        (root / "digits" / hidden).mkdir()
        (root / hidden).mkdir()
    for odd in ("007", "latest", "x", "y"):
        (root / "digits" / odd).mkdir()
    (root / "digits" / "4").write_text("a file")
    (root / "notes.txt").write_text("a file")
    os.mkdir(os.fsencode(root / "digits") + b"/caf\xe9")
    (root / "digits" / ("v" * 120)).mkdir()
    found, skipped = scan_model_entries(root, "digits")
    assert [(v.name, v.version, v.path, v.committed) for v in found] == [
        ("digits", v, root / "digits" / str(v), v == 2) for v in versions]
    assert scan_model(root, "digits") == found
    reason = f"not a version number (1 to {MAX_VERSION}; no leading zeros)"
    assert sorted(skipped, key=lambda s: s.entry) == sorted(
        [Skipped(odd, reason) for odd in ("007", "latest", "x", "y", "caf\\udce9", "v" * 100)]
        + [Skipped("4", "not a folder")], key=lambda s: s.entry)
    names, skipped = scan_names_entries(root)
    assert names == ["digits"] and skipped == [Skipped("notes.txt", "not a folder")]
    (root / "loop").symlink_to(root / "loop")
    assert scan_model_entries(root, "loop") == (
        [], [Skipped("loop", "cannot be read: Too many levels of symbolic links")])
