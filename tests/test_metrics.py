"""The metric helpers' arithmetic: bulk histogram observation, disagreement shares."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from service.codec import disagreement
from service.metrics import DISAGREEMENT_BUCKETS, observe_many, resident_bytes


def samples(h: Histogram) -> dict:
    """Bucket counts exact, the sum rounded (the order of additions differs)."""
    return {(s.name, s.labels.get("le")): round(s.value, 9) for s in h.collect()[0].samples}


def test_observe_many_equals_observing_one_by_one():
    values = np.array([0.0, 0.2, 0.2, 0.6, 1.0, 0.05, 3.0, 0.1])
    bulk = Histogram("a", "a", buckets=DISAGREEMENT_BUCKETS, registry=CollectorRegistry())
    single = Histogram("a", "a", buckets=DISAGREEMENT_BUCKETS, registry=CollectorRegistry())
    observe_many(bulk, values)
    for v in values:
        single.observe(float(v))
    assert samples(bulk) == samples(single)
    observe_many(bulk, np.array([]))
    assert samples(bulk) == samples(single)


def test_disagreement_is_the_share_of_members_off_the_ensembles_top_class():
    # two rows, three members, two classes
    members = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]],
                        [[0.1, 0.9], [0.2, 0.8], [0.4, 0.6]]])
    average = members.mean(axis=1)
    np.testing.assert_allclose(disagreement(members, average), [1 / 3, 0.0])
    assert disagreement(members[:0], average[:0]).shape == (0,)


def test_resident_memory_is_read():
    assert resident_bytes() > 10 * 2**20
