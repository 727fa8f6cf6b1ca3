"""A small closed-loop HTTP/1.1 load generator for the tests: N keep-alive connections, each
sending the next request as soon as the previous answer arrived, every answer recorded.

Raw asyncio streams, not an HTTP client library: about ten times cheaper per request, so the
generator does not starve the server it measures of the machine's two cores. It runs in a
thread with its own event loop, so a test can change the repository while load goes on.
"""

from __future__ import annotations

import asyncio
import re
import threading
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


async def _connection(port: int, request: bytes, stop: threading.Event, result: LoadResult,
                      pause: float) -> None:
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


class Load:
    """`with Load(port, body, connections=16) as load: ...`; `load.result` while and after."""

    def __init__(self, port: int, body: bytes, connections: int = 16, path: str = "/predict",
                 headers: dict[str, str] | None = None, pause: float = 0.0):
        self.port, self.connections, self.pause = port, connections, pause
        self.request = request_bytes(path, body, headers)
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="loadgen")

    def _run(self) -> None:
        async def main():
            await asyncio.gather(*(_connection(self.port, self.request, self._stop, self.result, self.pause)
                                   for _ in range(self.connections)))
        asyncio.run(main())

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.result
