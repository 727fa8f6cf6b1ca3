"""`ensemble-serve` as a real uvicorn process on a loopback port, for the process-level tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.conftest import free_port


# Versions compiled by any server of the test session: the first start on a version compiles it
# in a child process, later starts import it (as a restarted production server does).
COMPILED = Path(tempfile.mkdtemp(prefix="tests-server-compiled-"))


class ServerProcess:
    """Start with `ServerProcess(repository, ...).start()`; `.base`, `.port`, `.proc`, `.rss()`."""

    def __init__(self, repository: Path, env: dict[str, str] | None = None, args: list[str] | None = None,
                 port: int | None = None):
        self.repository = repository
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ENSEMBLE_POLL_INTERVAL_SECONDS": "0.2",
                    "ENSEMBLE_COMPILE_CACHE_DIR": str(COMPILED), **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()
        # One client for every poll: httpx.get() builds a client and its TLS context each call,
        # ~45 ms of CPU here. Polling /models 20 times a second that way took most of a core from
        # the server under test and inflated its latencies during reloads.
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def start(self, wait_ready: bool = True, timeout: float = 120) -> "ServerProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--repository", str(self.repository), "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *self.args],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                status = self.client.get("/readyz", timeout=2).status_code
                if status == 200 or not wait_ready:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready in {timeout} s: {self.output()[-3000:]}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def models(self, name: str = "digits") -> dict:
        return next(m for m in self.client.get("/models").json()["models"] if m["name"] == name)

    def wait_live(self, version: int, name: str = "digits", timeout: float = 120) -> float:
        """Wait until `version` is live; seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.models(name)["live"] == version:
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"version {version} not live after {timeout} s: {self.models(name)}")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def grpc_server(repository: Path, copy_to: Path | None = None, **kwargs) -> ServerProcess:
    """A started server with gRPC on a free port (`.grpc`: its address), serving `repository`,
    or a copy of it at `copy_to` when what a test publishes or breaks must stay its own."""
    if copy_to is not None:
        import shutil

        shutil.copytree(repository, copy_to, ignore=shutil.ignore_patterns(".work"))
        repository = copy_to
    port = free_port()
    server = ServerProcess(repository, args=["--grpc-port", str(port)], **kwargs).start()
    server.grpc = f"127.0.0.1:{port}"
    return server
