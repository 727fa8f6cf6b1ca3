"""Loading in the background without taking the cores from the requests being served: the
loader thread's lower priority, and a pacer that keeps its work to a share of the time."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

LOADER_NICENESS = 10
MAX_PACE_SLEEP = 2.0


def lower_thread_priority() -> None:
    """Loading competes with serving for the cores; the calling thread (the loader's) yields
    the CPU first (Linux threads have their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)
    except (AttributeError, OSError) as exc:
        log.debug("loader priority unchanged: %s", exc)


class Pacer:
    """Keeps a background job to a share of the time: each `step()` sleeps in proportion to the
    work done since the previous one. Loading a version takes CPU in proportion to its members;
    on busy cores, unpaced, it takes that time from the requests being served."""

    def __init__(self, duty_cycle: float, clock=time.monotonic, sleep=time.sleep):
        if not 0 < duty_cycle <= 1:
            raise ValueError("duty_cycle must be in (0, 1]")
        self.ratio = (1 - duty_cycle) / duty_cycle
        self.clock, self.sleep = clock, sleep
        self.last = clock()

    def step(self) -> None:
        worked = self.clock() - self.last
        if self.ratio and worked > 0:
            self.sleep(min(worked * self.ratio, MAX_PACE_SLEEP))
        self.last = self.clock()
