"""A small closed-loop HTTP/1.1 load generator for the tests: N keep-alive connections, each
sending the next request as soon as the previous answer arrived, every answer recorded.

Raw asyncio streams, not an HTTP client library: about ten times cheaper per request, so the
generator does not starve the server it measures of the machine's two cores. It runs in a
process of its own: in a thread of the test's process it shared one interpreter (one GIL) with
whatever the test does meanwhile (copying versions, polling /models with httpx), and the
latencies it recorded during those steps included its own waits for the GIL.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
from dataclasses import dataclass, field

import numpy as np

_VERSION = re.compile(rb'"version":(\d+)')


@dataclass
class Answer:
    started: float  # time.monotonic()
    latency: float  # seconds
    status: int  # 0: the connection failed
    version: int | None


@dataclass
class LoadResult:
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def between(self, start: float, stop: float) -> "LoadResult":
        return LoadResult([a for a in self.answers if start <= a.started < stop], self.errors)

    def within(self, windows: list[tuple[float, float]]) -> "LoadResult":
        """The answers started in any of `windows` ((start, stop) pairs, in time order)."""
        starts = np.array([w[0] for w in windows])
        picked = []
        for a in self.answers:
            i = int(np.searchsorted(starts, a.started, side="right")) - 1
            if i >= 0 and a.started < windows[i][1]:
                picked.append(a)
        return LoadResult(picked, self.errors)

    @property
    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for a in self.answers:
            out[a.status] = out.get(a.status, 0) + 1
        return out

    def percentile(self, q: float, status: int | None = 200) -> float:
        lat = [a.latency for a in self.answers if status is None or a.status == status]
        return float(np.percentile(lat, q)) if lat else float("nan")

    def rate(self) -> float:
        if len(self.answers) < 2:
            return 0.0
        span = self.answers[-1].started - self.answers[0].started
        return len(self.answers) / span if span > 0 else 0.0


def request_bytes(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _connection(port: int, request: bytes, stop, result: LoadResult, pause: float) -> None:
    reader = writer = None
    while not stop.is_set():
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                result.answers.append(Answer(time.monotonic(), 0.0, 0, None))
                result.errors.append(f"connect: {exc}")
                await asyncio.sleep(0.05)
                continue
        started = time.monotonic()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, AttributeError) as exc:
            result.answers.append(Answer(started, time.monotonic() - started, 0, None))
            result.errors.append(f"{type(exc).__name__}: {exc}")
            writer.close()
            reader = writer = None
            continue
        m = _VERSION.search(body)
        result.answers.append(Answer(started, time.monotonic() - started, status,
                                     int(m.group(1)) if m else None))
        if b"connection: close" in head.lower():
            writer.close()
            reader = writer = None
        if pause:
            await asyncio.sleep(pause)
    if writer is not None:
        writer.close()


def _generate(port: int, request: bytes, connections: int, pause: float, started, stop, pipe) -> None:
    """The load process: run the connections until `stop` is set, then send back the answers."""
    result = LoadResult()

    async def main():
        started.set()
        await asyncio.gather(*(_connection(port, request, stop, result, pause) for _ in range(connections)))

    asyncio.run(main())
    pipe.send(([(a.started, a.latency, a.status, a.version) for a in result.answers], result.errors[:1000]))
    pipe.close()


class Load:
    """`with Load(port, body, connections=16) as load: ...`; `load.result` once it has stopped.
    Times are `time.monotonic()`, the same clock in every process of the machine."""

    def __init__(self, port: int, body: bytes, connections: int = 16, path: str = "/predict",
                 headers: dict[str, str] | None = None, pause: float = 0.0):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding TensorFlow
        self.result = LoadResult()
        self._started, self._stop = ctx.Event(), ctx.Event()
        self._receive, send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_generate, daemon=True, name="loadgen",
            args=(port, request_bytes(path, body, headers), connections, pause, self._started, self._stop, send))

    def __enter__(self) -> "Load":
        self._process.start()
        if not self._started.wait(60):
            raise RuntimeError("the load generator process did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        if self._stop.is_set():
            return self.result
        self._stop.set()
        if self._receive.poll(60):
            answers, errors = self._receive.recv()
            self.result = LoadResult([Answer(*a) for a in answers], errors)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        return self.result
