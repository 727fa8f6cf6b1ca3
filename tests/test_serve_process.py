"""`ensemble-serve` as a real uvicorn process on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port


@pytest.fixture()
def server(repository):
    port = free_port()
    env = {**os.environ, "ENSEMBLE_POLL_INTERVAL_SECONDS": "0.2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--repository", str(repository), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not become ready in 90 s")
    yield base, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_served_over_http_with_env_settings(server, digits_test_split):
    base, _ = server
    resp = httpx.post(f"{base}/predict", json={"instances": digits_test_split.x[:5].astype(int).tolist()})
    assert resp.status_code == 200
    body = resp.json()
    assert body["model"] == {"name": "digits", "version": 1}
    assert len(body["labels"]) == 5
    accuracy = sum(int(l) == y for l, y in zip(body["labels"], digits_test_split.y[:5])) / 5
    assert accuracy >= 0.4  # a 3-epoch tiny ensemble; the full run is measured in the README
    assert "ensemble_requests_total" in httpx.get(f"{base}/metrics").text


def test_sigterm_stops_the_server_promptly(server):
    base, proc = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=1)


def test_invalid_setting_exits_2_naming_the_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--repository", str(tmp_path)],
        env={**os.environ, "ENSEMBLE_PORT": "99999"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "ENSEMBLE_PORT" in result.stderr and "65535" in result.stderr
