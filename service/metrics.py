"""Every Prometheus metric of the service, declared once, on a registry tests can replace."""

from __future__ import annotations

import os
import time

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
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service import codec

# Sub-millisecond to seconds: batched inference of small models lives at the low end.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
# Share of members disagreeing with the ensemble: k/M for M members; these bounds separate
# every k for M <= 10 (0 is its own bucket: full agreement).
DISAGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FAILURE_REASONS = ("uncommitted", "manifest", "checksum", "signature", "warmup", "load", "invalid")
REJECT_REASONS = ("queue_full", "deadline", "too_large")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """Resident memory of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def observe_many(histogram, values: np.ndarray) -> None:
    """Histogram.observe for every value, in one pass: counts per bucket and one sum.

    prometheus_client has no bulk observe; per-row calls would cost the event loop ~2 us each.
    This writes the same per-bucket counts `observe` would (it stores them non-cumulative,
    one value per upper bound) and works in multiprocess mode too."""
    if len(values) == 0:
        return
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(np.sum(values)))
    for i in np.flatnonzero(counts):
        histogram._buckets[i].inc(int(counts[i]))
CONTENT_TYPE = CONTENT_TYPE_LATEST
# `*_created` series double the exposition and no dashboard here uses them.
disable_created_metrics()


class ServiceMetrics:
    """The metric catalogue. One instance per app; pass a fresh registry in tests."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ensemble_requests", "HTTP requests by route template and status code",
            ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "ensemble_request_duration_seconds", "Time from request received to response sent",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
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
        self.disagreement = Histogram(
            "ensemble_member_disagreement_ratio", "Per predicted row: share of members whose top "
            "class differs from the ensemble's", ["model"], buckets=DISAGREEMENT_BUCKETS, registry=r)
        self.predicted_class = Counter(
            "ensemble_predicted_class", "Rows by the ensemble's top class", ["model", "class"], registry=r)
        self.ready = Gauge(
            "ensemble_ready", "1 when the service can answer predictions (GET /readyz is 200)",
            registry=r, multiprocess_mode="livemin")
        self.model_pinned_version = Gauge(
            "ensemble_model_pinned_version", "Version pinned through the admin routes or the "
            "configured policy (0: follows the newest good version)", ["model"], registry=r,
            multiprocess_mode="livemax")
        self.resident_memory = Gauge(
            "ensemble_process_resident_memory_bytes", "Resident memory of the service "
            "(summed over worker processes)", registry=r, multiprocess_mode="livesum")
        self.start_time = Gauge(
            "ensemble_process_start_time_seconds", "Start time of the service process, Unix time",
            registry=r, multiprocess_mode="livemin")
        self.start_time.set(time.time())
        self.rejected = Counter(
            "ensemble_rejected_requests", "Requests refused before inference, by reason "
            "(queue_full, deadline, too_large)", ["reason"], registry=r)
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

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One answered HTTP request: its count by route and status, and its duration."""
        self._child(self.requests, route, status).inc()
        self._child(self.request_duration, route).observe(seconds)

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
        observe_many(self.queue_wait, np.asarray(stats.queue_wait))
        if stats.average is not None:
            self.observe_predictions(stats.model, stats.classes, stats.average, stats.members)

    def observe_predictions(self, model: str, classes, average: np.ndarray, members: np.ndarray) -> None:
        """What only an ensemble has: member disagreement, and the predicted classes (drift)."""
        observe_many(self._child(self.disagreement, model), codec.disagreement(members, average))
        counts = np.bincount(average.argmax(axis=1), minlength=len(classes))
        for i in np.flatnonzero(counts):
            self._child(self.predicted_class, model, classes[i]).inc(int(counts[i]))

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
