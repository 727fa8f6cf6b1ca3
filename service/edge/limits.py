"""How much one request, and all requests at once, may make the server hold: the bound on its
memory whatever clients send.

Three limits, each checked before the memory it guards is spent:

- **The body limit** of a request: the largest body a valid request to the loaded ensembles can
  need (every row allowed, each number written out at its longest, pretty-printed), and never
  more than `max_body_bytes`. Checked on the declared Content-Length before a byte of the body
  is read, and again as a body without one arrives. Over it: 413, since no retry can help.
- **Bytes in flight**: the bodies being received or answered at once are at most
  `max_inflight_bytes`, reserved on the declared length before the body is read. Over it: 429
  with Retry-After. Bodies up to `SMALL_BODY` count against a pool of their own
  (`SMALL_POOL`), so a few clients sending large bodies cannot starve the many small requests.
- **The values a JSON body may hold**: parsing turns every number, list and object into a
  Python object of 24-64 bytes, 10-30 times the bytes of its text. `json_values` counts an upper
  bound of them on the bytes (a few GB/s) before parsing, and a body holding more than a valid
  request can is a 413 without being parsed. Parsing runs on the event loop, one body at a
  time, so at most one parse's objects exist at once.

With these, a server's memory is its idle size, plus the bodies in flight
(`max_inflight_bytes + SMALL_POOL`, each buffer up to 1/8 over-allocated as it grows), plus one
parse (at most about 32 bytes a value, and up to four working copies of its body), plus the
queued rows (`max_queue_rows`) and the batches computing; docs/operations.md states the figures.
"""

from __future__ import annotations

import math
from functools import lru_cache

from service.repository import InputSpec

SMALL_BODY = 64 * 1024
SMALL_POOL = 16 * 1024 * 1024
# The most text a valid request needs for one number: 24 characters for the longest float64
# (-2.2250738585072014e-308), with room for the indentation of a pretty-printed body.
BYTES_PER_NUMBER = 64
# What a request holds besides its rows: field names, an id, outputs, parameters.
ENVELOPE_BYTES = 64 * 1024
ENVELOPE_VALUES = 1024


@lru_cache(maxsize=64)
def values_per_row(shape: tuple[int, ...]) -> int:
    """The JSON values one row of `shape` is made of: its numbers and its nested lists."""
    lists, width = 0, 1
    for d in shape:
        lists += width  # one list per element of the level above
        width *= d
    return width + lists


def largest_body(spec: InputSpec, max_rows: int) -> int:
    """The most bytes a valid request of `max_rows` rows of `spec` can need."""
    return max_rows * math.prod(spec.shape) * BYTES_PER_NUMBER + ENVELOPE_BYTES


def json_value_limit(spec: InputSpec, max_rows: int, cap: int) -> int:
    """The most JSON values a valid request can hold (`cap` at most)."""
    return min(cap, max_rows * values_per_row(spec.shape) + ENVELOPE_VALUES)


def json_values(body: bytes) -> int:
    """An upper bound of the values parsing `body` as JSON creates: a value is followed by a
    comma or closes its container, and each container is one value itself. Brackets inside
    strings are counted too, which only makes the bound looser."""
    containers = body.count(b"[") + body.count(b"{")
    return body.count(b",") + 2 * containers + 1


class Hold:
    """The bytes a body of unknown length (chunked) holds of an InflightBytes budget so far."""

    __slots__ = ("small", "large")

    def __init__(self) -> None:
        self.small = self.large = 0


class InflightBytes:
    """Bytes of request bodies held at once. A body of known length is reserved whole before it
    is read (`reserve`, `release`); one without grows its Hold chunk by chunk (`grow`,
    `release_hold`). A body up to SMALL_BODY is held in the small pool, a larger one in the
    main budget. Used from the event loop's thread only (both HTTP paths run there), so it
    takes no lock."""

    def __init__(self, budget: int, small_pool: int = SMALL_POOL):
        self.budget, self.small_pool = budget, small_pool
        self.large = self.small = 0

    def reserve(self, n: int) -> bool:
        """Hold n bytes if the budget allows; False (nothing held) if it does not."""
        if n <= SMALL_BODY:
            if self.small + n > self.small_pool:
                return False
            self.small += n
        else:
            if self.large + n > self.budget:
                return False
            self.large += n
        return True

    def release(self, n: int) -> None:
        """Give back what `reserve(n)` held."""
        if n <= SMALL_BODY:
            self.small -= n
        else:
            self.large -= n

    def grow(self, hold: Hold, total: int) -> bool:
        """Make `hold` cover `total` bytes if the budget allows; False (hold unchanged) if not."""
        if total <= SMALL_BODY:
            if self.small + total - hold.small > self.small_pool:
                return False
            self.small += total - hold.small
            hold.small = total
            return True
        if self.large + total - hold.large > self.budget:
            return False
        self.large += total - hold.large
        self.small -= hold.small
        hold.large, hold.small = total, 0
        return True

    def release_hold(self, hold: Hold) -> None:
        self.small -= hold.small
        self.large -= hold.large
        hold.small = hold.large = 0

    @property
    def held(self) -> int:
        return self.large + self.small
