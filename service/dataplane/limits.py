"""How much one request, and all requests at once, may make the server hold: the bound on its
memory whatever clients send.

Three limits, each checked before the memory it guards is spent:

- **The body limit** of a request: the largest body a valid request to the loaded ensembles can
  need (every row allowed, each number written out at its longest, pretty-printed), and never
  more than `max_body_bytes`. Checked on the declared Content-Length before a byte of the body
  is read, and again as a body without one arrives. Over it: 413, since no retry can help.
- **Bytes in flight**: the bodies being received or answered at once are at most
  `max_inflight_bytes`, counted as their bytes arrive (a connection that declares a length and
  sends nothing holds nothing), and at most `max_inflight_bytes_per_peer` of them from one
  client address. Over either: 429 with Retry-After. Bodies up to `SMALL_BODY` count against a
  pool of their own (`SMALL_POOL`), so a few clients sending large bodies cannot starve the
  many small requests.
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

from contract.manifest import InputSpec

SMALL_BODY = 64 * 1024
SMALL_POOL = 16 * 1024 * 1024
# The most text a valid request needs for one number: 24 characters for the longest float64
# (-2.2250738585072014e-308), with room for the indentation of a pretty-printed body.
BYTES_PER_NUMBER = 64
# The most bytes one value takes in a protobuf message (an int64 varint; a double takes 8).
BYTES_PER_PROTO_VALUE = 10
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


def largest_message(spec: InputSpec, max_rows: int) -> int:
    """The most bytes a valid gRPC message of `max_rows` rows of `spec` can need: each value at
    its longest in protobuf (an int64 as a varint: 10 bytes), and the envelope."""
    return max_rows * math.prod(spec.shape) * BYTES_PER_PROTO_VALUE + ENVELOPE_BYTES


def json_value_limit(spec: InputSpec, max_rows: int, cap: int) -> int:
    """The most JSON values a valid request can hold (`cap` at most)."""
    return min(cap, max_rows * values_per_row(spec.shape) + ENVELOPE_VALUES)


# What an object array of strings holds per value besides the string's bytes: a pointer and a
# bytes object's header (CPython's `sys.getsizeof(b"")` is 33).
STRING_OVERHEAD = 8 + 33


def decoded_bytes(x) -> int:
    """The memory a request's decoded strings hold (an object array per string input of a
    format-2 version), which can be many times the body they came in: a value of one byte in
    the body becomes an object of 41. Numbers are 0 here: their arrays are no larger than a few
    times their body, and the body itself is held while the request is answered."""
    if not isinstance(x, dict):
        return 0
    held = 0
    for array in x.values():
        if array.dtype == object:
            held += array.size * STRING_OVERHEAD + sum(map(len, array.reshape(-1).tolist()))
    return held


def json_values(body: bytes) -> int:
    """An upper bound of the values parsing `body` as JSON creates: a value is followed by a
    comma or closes its container, and each container is one value itself. Brackets inside
    strings are counted too, which only makes the bound looser."""
    containers = body.count(b"[") + body.count(b"{")
    return body.count(b",") + 2 * containers + 1


class Hold:
    """The bytes one request's body holds of an InflightBytes budget so far, and the peer it
    came from."""

    __slots__ = ("small", "large", "peer")

    def __init__(self, peer: str = "") -> None:
        self.small = self.large = 0
        self.peer = peer


def peer_of(client: tuple | None) -> str:
    """The peer a body's bytes in flight count against: the address of an ASGI or uvicorn
    client (host, port), "" when unknown."""
    return client[0] if client else ""


class InflightBytes:
    """Bytes of request bodies held at once, counted as they arrive: each request's Hold grows
    with its body (`grow`) and is given back when the request is answered (`release_hold`). A
    body up to SMALL_BODY is held in the small pool, a larger one in the main budget; and no
    peer (a client address) may hold more than `per_peer` of either, so one client cannot take
    the budget from the others. Used from the event loop's thread only (both HTTP paths and gRPC
    run there), so it takes no lock."""

    def __init__(self, budget: int, small_pool: int = SMALL_POOL, per_peer: int | None = None):
        self.budget, self.small_pool = budget, small_pool
        self.per_peer = budget + small_pool if per_peer is None else per_peer
        self.large = self.small = 0
        self._peers: dict[str, int] = {}  # bytes held by each peer holding any

    def grow(self, hold: Hold, total: int) -> bool:
        """Make `hold` cover `total` bytes if the budgets allow; False (hold unchanged) if not."""
        more = total - hold.small - hold.large
        if more <= 0:
            return True
        peer = self._peers.get(hold.peer, 0)
        if peer + more > self.per_peer:
            return False
        if total <= SMALL_BODY:
            if self.small + more > self.small_pool:
                return False
            self.small += more
            hold.small = total
        else:
            if self.large + total - hold.large > self.budget:
                return False
            self.large += total - hold.large
            self.small -= hold.small
            hold.large, hold.small = total, 0
        self._peers[hold.peer] = peer + more
        return True

    def release_hold(self, hold: Hold) -> None:
        """Give back all that `hold` holds."""
        held = hold.small + hold.large
        if held:
            self.small -= hold.small
            self.large -= hold.large
            left = self._peers[hold.peer] - held
            if left:
                self._peers[hold.peer] = left
            else:
                del self._peers[hold.peer]
            hold.small = hold.large = 0

    @property
    def held(self) -> int:
        return self.large + self.small

    def held_by(self, peer: str) -> int:
        """Bytes the peer holds now."""
        return self._peers.get(peer, 0)

    def refusal(self, hold: Hold, total: int) -> str:
        """Why `grow(hold, total)` was refused, for the 429's message."""
        more, peer = total - hold.small - hold.large, self.held_by(hold.peer)
        if peer + more > self.per_peer:
            return (f"this client holds {peer} bytes of requests being received or answered; {more} more "
                    f"would pass the limit of {self.per_peer} per client")
        if total <= SMALL_BODY:
            return (f"the server holds {self.small} bytes of small requests being received or answered; "
                    f"{more} more would pass their limit of {self.small_pool}")
        return (f"the server holds {self.large} bytes of requests being received or answered; {more} more "
                f"would pass the limit of {self.budget}")


# What one connection may hold besides its body: uvicorn stops reading past 64 KiB of unread
# body, after one read of up to 256 KiB (asyncio's), and the guard's head and trailers.
READ_BUFFER_BYTES = 320 * 1024
# What gRPC needs for a message while it is received and parsed, in messages.
GRPC_COPIES = 3
# The queue, the batches computing and the allocator's slack.
WORKING_BYTES = 64 * 1024 * 1024


def memory_bound(settings, body_limit: int, message_limit: int, json_values: int) -> int:
    """The most bytes clients can make one server process hold above its idle size
    (docs/operations.md, "Memory under hostile clients"), for a body limit, a gRPC message limit
    and a JSON value limit."""
    heads = settings.max_connections * (2 * settings.max_header_bytes + READ_BUFFER_BYTES)
    bodies = (settings.max_inflight_bytes + SMALL_POOL) * 9 // 8
    parse = 32 * json_values + 4 * body_limit
    # Two gRPC servers while one hands over to the other (a version that changed the limit).
    grpc = 2 * settings.max_grpc_calls * GRPC_COPIES * message_limit if settings.grpc_port else 0
    return heads + bodies + parse + grpc + WORKING_BYTES
