"""The metric helpers' arithmetic: bulk histogram observation, disagreement shares."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from service.answer import disagreement
from service.metrics import DISAGREEMENT_BUCKETS, BatchHistogram, resident_bytes


def samples(registry: CollectorRegistry) -> dict:
    """Bucket counts exact, the sum rounded (the order of additions differs)."""
    return {(s.name, s.labels.get("m"), s.labels.get("le")): round(s.value, 9)
            for family in registry.collect() for s in family.samples}


def test_observe_many_equals_observing_one_by_one():
    values = np.array([0.0, 0.2, 0.2, 0.6, 1.0, 0.05, 3.0, 0.1])
    bulk_registry, single_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BatchHistogram("a", "a", ["m"], buckets=DISAGREEMENT_BUCKETS, registry=bulk_registry)
    single = Histogram("a", "a", ["m"], buckets=DISAGREEMENT_BUCKETS, registry=single_registry)
    bulk.observe_many(("x",), values)
    for v in values:
        single.labels("x").observe(float(v))
    assert samples(bulk_registry) == samples(single_registry)
    bulk.observe_many(("x",), np.array([]))
    assert samples(bulk_registry) == samples(single_registry)
    bulk.observe_many(("x",), values[:3])
    for v in values[:3]:
        single.labels("x").observe(float(v))
    assert samples(bulk_registry) == samples(single_registry)
    many = np.tile(values, 3)  # past the few values counted without numpy: the other path
    bulk.observe_many(("x",), many)
    for v in many:
        single.labels("x").observe(float(v))
    assert samples(bulk_registry) == samples(single_registry)


def test_disagreement_is_the_share_of_members_off_the_ensembles_top_class():
    # two rows, three members, two classes
    members = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]],
                        [[0.1, 0.9], [0.2, 0.8], [0.4, 0.6]]])
    average = members.mean(axis=1)
    np.testing.assert_allclose(disagreement(members, average), [1 / 3, 0.0])
    assert disagreement(members[:0], average[:0]).shape == (0,)


def test_resident_memory_is_read():
    assert resident_bytes() > 10 * 2**20


def test_with_worker_processes_observe_many_feeds_a_stock_histogram(monkeypatch, tmp_path):
    """In multiprocess mode the workers' values are combined from the files stock metrics
    write, so the batch histogram hands each value to one."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    values = np.array([0.0, 0.2, 0.2, 1.0])
    bulk_registry, single_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BatchHistogram("a", "a", ["m"], buckets=DISAGREEMENT_BUCKETS, registry=bulk_registry)
    single = Histogram("a", "a", ["m"], buckets=DISAGREEMENT_BUCKETS, registry=single_registry)
    assert isinstance(bulk._stock, Histogram)
    bulk.observe_many(("x",), values)
    for v in values:
        single.labels("x").observe(float(v))
    assert samples(bulk_registry) == samples(single_registry)
