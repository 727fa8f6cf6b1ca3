"""Every Prometheus metric of the service, declared once, on a registry tests can replace."""

from __future__ import annotations

import os

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

# Sub-millisecond to seconds: batched inference of small models lives at the low end.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
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
            "ensemble_queue_depth_rows", "Rows waiting in the batch queue", registry=r,
            multiprocess_mode="livesum")
        self.rejected = Counter(
            "ensemble_rejected_requests", "Requests refused before inference, by reason "
            "(queue_full, deadline, too_large)", ["reason"], registry=r)

    def observe_batch(self, stats) -> None:
        """Record one batch (service.batching.BatchStats)."""
        self.batch_size.observe(stats.rows)
        self.inference_duration.observe(stats.inference_seconds)
        for wait in stats.queue_wait:
            self.queue_wait.observe(wait)

    def exposition(self) -> bytes:
        """The exposition text; with several worker processes, every worker's values combined."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)
