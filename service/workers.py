"""Several server processes on one port, each accepting connections on its own socket.

uvicorn's own `--workers` shares one listening socket among its workers, and the worker that
wakes first takes every connection waiting: clients that open their connections together (a
pool, a load generator) can all land on one worker while the others idle, and the process
serves no more than one would (docs/performance.md has the measurement). Here every worker
listens on a socket of its own with SO_REUSEPORT, and Linux spreads new connections across them.

The supervisor starts the workers (spawned: a fresh interpreter each), starts again one that
dies, and on SIGTERM or SIGINT passes the signal to every worker, waits for them to drain their
requests, and ends the way one uvicorn process does: by the same signal (exit status 143 for
SIGTERM).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

BACKLOG = 2048
RESTART_PAUSE_SECONDS = 1.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port that others may share (SO_REUSEPORT); OSError if the
    address is taken by a socket that does not share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _worker(host: str, port: int, uvicorn_options: dict[str, Any]) -> None:
    """One worker process: its own listening socket, then uvicorn with the app factory."""
    import uvicorn

    sock = listening_socket(host, port)
    config = uvicorn.Config("service.cli:worker_app", factory=True, host=host, port=port, **uvicorn_options)
    uvicorn.Server(config).run(sockets=[sock])


def supervise(workers: int, host: str, port: int, uvicorn_options: dict[str, Any], grace_seconds: float) -> int:
    """Run `workers` worker processes until SIGTERM or SIGINT; returns an exit status only if
    the address cannot be listened on (else the process ends by the signal it received)."""
    try:
        listening_socket(host, port).close()  # taken by someone else: say so once, not per worker
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    from prometheus_client import multiprocess

    context = multiprocessing.get_context("spawn")
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    def start():
        process = context.Process(target=_worker, args=(host, port, uvicorn_options), daemon=False)
        process.start()
        return process

    processes = [start() for _ in range(workers)]
    log.info("%d workers on %s:%d, each with its own socket (SO_REUSEPORT): pids %s", workers, host, port,
             [p.pid for p in processes])
    while not stop.wait(0.5):
        for i, process in enumerate(processes):
            if process.is_alive():
                continue
            log.error("worker %d exited with status %s; starting another", process.pid, process.exitcode)
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                multiprocess.mark_process_dead(process.pid)
            if stop.wait(RESTART_PAUSE_SECONDS):
                break
            processes[i] = start()
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds + 10
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("worker %d did not stop within %.0f s; killing it", process.pid, grace_seconds + 10)
            process.kill()
            process.join()
    signum = received[0]
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # not reached: the signal ends the process
