"""Every Prometheus metric of the service, declared once, on a registry tests can replace,
through prometheus_client's public API."""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from typing import Iterator, Sequence

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from contract.tasks import EPISTEMIC, predicted_columns
from service.answer import Answer

# Sub-millisecond to seconds: batched inference of small models lives at the low end.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
# Share of members disagreeing with the ensemble: k/M for M members; these bounds separate
# every k for M <= 10 (0 is its own bucket: full agreement).
DISAGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Mutual information between the prediction and the member (nats): 0 when members agree, at most
# log(members) (1.6 for five); fine steps at the low end, where in-distribution rows sit.
MUTUAL_INFORMATION_BUCKETS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
# A head's epistemic score per row: nats for classes and labels (at most log(members)), the
# target's own units for regression (the spread of the members' means): log steps wide enough
# for both.
HEAD_UNCERTAINTY_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0,
                            300.0, 1000.0)
FAILURE_REASONS = ("uncommitted", "manifest", "checksum", "signature", "warmup", "load", "invalid")
REJECT_REASONS = ("queue_full", "bytes_in_flight", "deadline", "too_large")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """Resident memory of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_FEW = 8  # batches of at most this many values are counted without numpy (BatchHistogram)


class BatchHistogram(Collector):
    """A labelled histogram that takes a whole batch of values in one call (`observe_many`).

    prometheus_client's Histogram has no bulk observe, and per-value calls cost the event loop
    about a microsecond each: a 256-row request's per-row observations would cost more than its
    response's encoding. So the counts per bucket are kept here in numpy and exposed through a
    custom collector (prometheus_client's public extension point). With several worker
    processes (PROMETHEUS_MULTIPROC_DIR set), metrics are combined from the files each stock
    metric writes, so there each value goes to a stock Histogram instead."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = np.array([*buckets, float("inf")] if buckets[-1] != float("inf") else buckets, dtype=float)
        self._bounds = self.bounds.tolist()
        self._stock = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self._stock = Histogram(name, documentation, self.labelnames, buckets=buckets, registry=registry)
        else:
            self._lock = threading.Lock()
            self._series: dict[tuple[str, ...], list] = {}  # labels -> [counts per bucket, sum]
            registry.register(self)

    def observe_many(self, labels: tuple[str, ...], values: np.ndarray) -> None:
        """Observe every value for the series of `labels`: counts per bucket and one sum."""
        if len(values) == 0:
            return
        if self._stock is not None:
            child = self._stock.labels(*labels)
            for value in np.asarray(values, dtype=float).tolist():
                child.observe(value)
            return
        if len(values) <= _FEW:  # a few values: bisect in Python beats numpy's per-call overhead
            values = values.tolist() if isinstance(values, np.ndarray) else list(values)
            slots = [bisect_left(self._bounds, v) for v in values]
            with self._lock:
                series = self._get(labels)
                for i in slots:
                    series[0][i] += 1
                series[1] += sum(values)
            return
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds))
        total = float(np.sum(values))
        with self._lock:
            series = self._get(labels)
            series[0] += counts
            series[1] += total

    def _get(self, labels: tuple[str, ...]) -> list:
        """The [counts per bucket, sum] of a series, created at zero (with the lock held)."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [np.zeros(len(self.bounds), dtype=np.int64), 0.0]
        return series

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if self._stock is None:
            with self._lock:
                series = [(labels, counts.cumsum(), total) for labels, (counts, total) in self._series.items()]
            for labels, cumulative, total in series:
                buckets = [(floatToGoString(le), float(n)) for le, n in zip(self.bounds, cumulative)]
                family.add_metric(list(labels), buckets, total)
        yield family

    def describe(self) -> list:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]


CONTENT_TYPE = CONTENT_TYPE_LATEST
# `*_created` series double the exposition and no dashboard here uses them.
disable_created_metrics()


class ServiceMetrics:
    """The metric catalogue. One instance per app; pass a fresh registry in tests."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ensemble_requests", "Requests by protocol (http, grpc), route (an HTTP route's template, "
            "a gRPC method's full name) and status (HTTP's; for gRPC the HTTP status whose gRPC code "
            "was sent, service.rpc.calls)", ["protocol", "route", "status"], registry=r)
        self.request_duration = Histogram(
            "ensemble_request_duration_seconds", "Time from request received to response sent",
            ["protocol", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.predicted_rows = Counter(
            "ensemble_predicted_rows", "Rows answered by the ensemble", ["model"], registry=r)
        self.model_version = Gauge(
            "ensemble_model_version", "Version number live for each ensemble (0: none)",
            ["model"], registry=r, multiprocess_mode="livemax")
        self.model_members = Gauge(
            "ensemble_model_members", "Number of members in the live version", ["model"], registry=r,
            multiprocess_mode="livemax")
        self.reloads = Counter(
            "ensemble_model_reloads", "Attempts to load a version, by result (success, failure)",
            ["model", "result"], registry=r)
        self.reload_failures = Counter(
            "ensemble_model_reload_failures", "Versions refused, by reason (uncommitted, manifest, "
            "checksum, signature, warmup, load)", ["model", "reason"], registry=r)
        self.reload_duration = Histogram(
            "ensemble_model_reload_duration_seconds", "Time to verify, load and warm a version",
            ["model"], buckets=RELOAD_BUCKETS, registry=r)

        self.batch_size = Histogram(
            "ensemble_batch_size_rows", "Rows per call of the ensemble", buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "ensemble_queue_wait_seconds", "Time a request waited in the batch queue",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "ensemble_inference_duration_seconds", "Time of one batched call of the ensemble",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "ensemble_queue_depth_rows", "Rows left waiting in the batch queue when the last batch "
            "was taken", registry=r, multiprocess_mode="livesum")
        self.disagreement = BatchHistogram(
            "ensemble_member_disagreement_ratio", "Per predicted row: share of members whose top "
            "class differs from the ensemble's", ["model"], buckets=DISAGREEMENT_BUCKETS, registry=r)
        self.mutual_information = BatchHistogram(
            "ensemble_mutual_information_nats", "Per predicted row: the members' disagreement as "
            "information (contract.scores), the epistemic part of its uncertainty", ["model"],
            buckets=MUTUAL_INFORMATION_BUCKETS, registry=r)
        self.reference_mutual_information = Gauge(
            "ensemble_reference_mutual_information_nats", "Mean mutual information of the live "
            "version on its validation split (the level a drift alert compares with; 0: not recorded)",
            ["model"], registry=r, multiprocess_mode="livemax")
        self.abstained_rows = Counter(
            "ensemble_abstained_rows", "Rows whose uncertainty is above the live version's abstention "
            "threshold", ["model"], registry=r)
        self.predicted_class = Counter(
            "ensemble_predicted_class", "Rows by the ensemble's top class", ["model", "class"], registry=r)
        # Per head, for every task (a format-1 version's one head is `probabilities`).
        self.head_uncertainty = BatchHistogram(
            "ensemble_head_uncertainty", "Per predicted row and head: its task's epistemic score "
            "(contract.tasks.EPISTEMIC): the members' mutual information in nats for classes and labels "
            "(the largest of a head's labels), the spread of their means (epistemic_std, in the "
            "target's units) for regression", ["model", "head", "score"], buckets=HEAD_UNCERTAINTY_BUCKETS,
            registry=r)
        self.reference_head_uncertainty = Gauge(
            "ensemble_reference_head_uncertainty", "The live version's mean of a head's epistemic "
            "score on its validation split (the level the drift alert compares with; 0: not recorded)",
            ["model", "head", "score"], registry=r, multiprocess_mode="livemax")
        self.head_predicted = Counter(
            "ensemble_head_predicted", "Rows by what a head predicts: a classification head's top "
            "class, a binary head's label at probability 0.5, each label of a multi-label head at 0.5 "
            "or more (a row may count for several)", ["model", "head", "label"], registry=r)
        self.head_abstained_rows = Counter(
            "ensemble_head_abstained_rows", "Rows a head abstains on (its abstention rule)",
            ["model", "head"], registry=r)
        self.ready = Gauge(
            "ensemble_ready", "1 when the service can answer predictions (GET /readyz is 200)",
            registry=r, multiprocess_mode="livemin")
        self.model_pinned_version = Gauge(
            "ensemble_model_pinned_version", "Version pinned through the admin routes or the "
            "configured policy (0: follows the newest good version)", ["model"], registry=r,
            multiprocess_mode="livemax")
        self.pins_file_valid = Gauge(
            "ensemble_pins_file_valid", "1 when the shared pins file was read and accepted at the "
            "last poll (or there is none: no pins); 0 when it is damaged and the pins read before "
            "it stay in force, or none were (then no version is served)", registry=r,
            multiprocess_mode="livemin")
        self.http_fast_path = Gauge(
            "ensemble_http_fast_path", "1 when HTTP is served by the fast path (service.edge.fast_http), "
            "0 when by uvicorn's stock protocol", registry=r, multiprocess_mode="livemin")
        self.resident_memory = Gauge(
            "ensemble_process_resident_memory_bytes", "Resident memory of the service "
            "(summed over worker processes)", registry=r, multiprocess_mode="livesum")
        self.start_time = Gauge(
            "ensemble_process_start_time_seconds", "Start time of the service process, Unix time",
            registry=r, multiprocess_mode="livemin")
        self.start_time.set(time.time())
        self.rejected = Counter(
            "ensemble_rejected_requests", "Requests refused before inference, by reason "
            "(queue_full, bytes_in_flight, deadline, too_large)", ["reason"], registry=r)
        for reason in REJECT_REASONS:  # at 0 from the start, so `increase()` sees the first
            self.rejected.labels(reason)
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels):
        """`metric.labels(*labels)`, looked up once: `labels()` takes a lock and validates on
        every call (~2 us), too much for every request and every batch."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, route: str, status: int, seconds: float, protocol: str = "http") -> None:
        """One answered request: its count by protocol, route and status, and its duration."""
        self._child(self.requests, protocol, route, status).inc()
        self._child(self.request_duration, protocol, route).observe(seconds)

    def observe_rows(self, model: str, rows: int) -> None:
        """Rows answered by a model's ensemble."""
        self._child(self.predicted_rows, model).inc(rows)

    def register_model(self, model: str) -> None:
        """Create a model's failure series at 0, so `increase()` sees its first failure."""
        for result in ("success", "failure"):
            self.reloads.labels(model, result)
        for reason in FAILURE_REASONS:
            self.reload_failures.labels(model, reason)

    def observe_batch(self, stats) -> None:
        """Record one batch (service.batching.BatchStats)."""
        self.batch_size.observe(stats.rows)
        self.inference_duration.observe(stats.inference_seconds)
        for wait in stats.queue_wait:  # one per request, as the request duration is
            self.queue_wait.observe(wait)
        answer = getattr(stats.predictor, "answer", None)  # an ensemble's: service.answer
        if answer is not None and stats.outputs:
            self.observe_answer(answer(stats.outputs))

    def observe_answer(self, answer: Answer) -> None:
        """What only an ensemble has, per head: rows that abstained, its task's epistemic score,
        what it predicts (drift); for a classification head also member disagreement, and the
        model-level series of the predicted classes and mutual information."""
        model = answer.name
        for head in answer.heads.values():
            abstain = head.abstain()
            abstained = int(np.count_nonzero(abstain)) if abstain is not None else 0
            if abstained:
                self._child(self.abstained_rows, model).inc(abstained)
                self._child(self.head_abstained_rows, model, head.name).inc(abstained)
            score = EPISTEMIC[head.task]
            values = head.score(score)
            self.head_uncertainty.observe_many((model, head.name, score),
                                               values if values.ndim == 1 else values.max(axis=1))
            chosen = predicted_columns(head.task, head.combined)
            if chosen is None:  # regression: numbers, no labels
                continue
            counts = chosen.sum(axis=0)
            if head.task == "classification":
                for i in np.flatnonzero(counts):
                    self._child(self.predicted_class, model, head.labels[i]).inc(int(counts[i]))
                self.disagreement.observe_many((model,), head.disagreement())
                self.mutual_information.observe_many((model,), head.score("mutual_information"))
            for i in np.flatnonzero(counts):
                self._child(self.head_predicted, model, head.name, head.labels[i]).inc(int(counts[i]))

    def update_process(self) -> None:
        self.resident_memory.set(resident_bytes())

    def exposition(self) -> bytes:
        """The exposition text; with several worker processes, every worker's values combined."""
        self.update_process()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)
