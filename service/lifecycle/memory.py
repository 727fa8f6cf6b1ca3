"""The garbage collector's policy while serving: fewer young collections, and versions freed
without stalling the event loop."""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

# Young collections every 20,000 allocations instead of Python's 700. A one-row request
# allocates a few hundred objects (JSON, lists, futures), so the default collected every few
# requests; only cyclic garbage waits for a collection, the rest is freed at once.
# docs/performance.md has the measurement.
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Fewer young collections while serving (see YOUNG_GENERATION_THRESHOLD)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def release_garbage(first: bool) -> None:
    """Free a dropped version without stalling the event loop later.

    TensorFlow and Keras leave hundreds of thousands of long-lived objects; a full collection
    over them stalls the loop for a long time. After the first version is live, everything that
    exists (the modules, the first version) is frozen out of the collector's sight, so later
    collections only walk what later loads created: the loaded versions and the garbage of the
    dropped one. (The first version's objects stay frozen: one version's memory, once.)
    """
    started = time.perf_counter()
    gc.collect()
    if first:
        gc.freeze()
    log.debug("garbage collection after swap: %.1f ms", (time.perf_counter() - started) * 1000)
