"""A real Prometheus scrapes a real service under a little load; every query of the Grafana
dashboard and every expression of the alerting rules must return data through its HTTP API.

The queries are read from deploy/grafana/dashboards/ensemble-serving.json and
deploy/prometheus/alerts.yml (tests/deploy_checks.py), never copied here. An alert's condition
is false on a healthy service, so each rule expression runs with its comparisons made `bool`
(0/1 per series instead of dropping series): it returns data whenever every metric and label
it names exists. The rare series (rejections of each reason, reload failures, 5xx) are caused
on purpose: a too-large request, a queue overflow, an expired deadline, a broken version.

Prometheus and promtool come from Debian's `prometheus` package, installed here when missing.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import free_port
from tests.server import ServerProcess
from tests.deploy_checks import (
    PROMETHEUS_DIR,
    dashboard_queries,
    dashboard_variable_queries,
    ensure_debian_packages,
    rules,
    without_filtering,
)

pytestmark = pytest.mark.slow

MAX_ROWS = 64  # ENSEMBLE_MAX_ROWS_PER_REQUEST: 65 rows is a 413 (too_large)
MAX_QUEUE = 64  # ENSEMBLE_MAX_QUEUE_ROWS: requests of 48 rows sent at once overflow it: 429 (queue_full)


@pytest.fixture(scope="module")
def promtool() -> str:
    reason = ensure_debian_packages({"promtool": "prometheus", "prometheus": "prometheus"})
    if reason:
        pytest.skip(reason)
    return shutil.which("promtool")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def test_promtool_accepts_the_config_the_rules_and_the_rule_unit_tests(promtool):
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        result = run([promtool, *args], cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def wait_for(what: str, probe, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            value = probe()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def scrape_config(port: int, folder: Path) -> Path:
    """deploy/prometheus/prometheus.yml with the api at 127.0.0.1:port, everything every second,
    and the real rules file."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        job.update(scrape_interval="1s", scrape_timeout="1s")
        job.pop("dns_sd_configs", None)  # compose's DNS name of the api replicas: here, the one server
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def send_load(base: str, rows: list, stop: threading.Event) -> dict[int, int]:
    """Mixed traffic on the three inference routes until `stop`, plus one of each rejection."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    with httpx.Client(base_url=base, timeout=10) as client, ThreadPoolExecutor(8) as pool:
        def post(path: str, **kw) -> int:
            status = client.post(path, **kw).status_code
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
            return status

        post("/predict", content=b"{not json")  # 400
        post("/predict", json={"instances": "three"})  # 422
        post("/predict", json={"instances": rows[:MAX_ROWS + 1]})  # 413 too_large
        for _ in range(50):  # 8 requests of 48 rows at once: more than the queue holds, 429 queue_full
            burst = [pool.submit(post, "/predict", json={"instances": rows[:48]}) for _ in range(8)]
            if 429 in [f.result() for f in burst]:
                break
        post("/v1/models/broken:predict", json={"instances": rows[:1]})  # no good version: 5xx
        post("/v1/models/nothere:predict", json={"instances": rows[:1]})  # 404
        for _ in range(50):  # a deadline that has passed by the time the batcher looks: 504
            if post("/predict", json={"instances": rows[:1]}, headers={"X-Request-Timeout-Ms": "0.001"}) == 504:
                break
        i = 0
        while not stop.is_set():
            n = 1 + i % 8
            batch = rows[i % 32: i % 32 + n]
            post("/predict", json={"instances": batch})
            post("/v1/models/digits:predict", json={"instances": batch})
            flat = np.asarray(batch, dtype=np.float32).reshape(-1).tolist()
            post("/v2/models/digits/infer", json={"inputs": [{
                "name": "instances", "shape": [len(batch), 8, 8, 1], "datatype": "FP32",
                "data": flat}]})
            i += 1
            time.sleep(0.02)
    return statuses


@pytest.fixture(scope="module")
def live(promtool, trained_repository, digits_test_split, tmp_path_factory):
    """(service URL, Prometheus URL, statuses sent): the service on a copy of the tiny digits
    repository, with a broken second ensemble, scraped every second by a real Prometheus for
    a few seconds of load; then a broken digits version 2 published."""
    tmp = tmp_path_factory.mktemp("prometheus")
    repo = tmp / "models"
    shutil.copytree(trained_repository, repo, ignore=shutil.ignore_patterns(".work"))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "manifest.json").write_text("{}")

    prom_port = free_port()
    service = ServerProcess(repo, env={
        "ENSEMBLE_POLL_INTERVAL_SECONDS": "0.5", "ENSEMBLE_DEFAULT_MODEL": "digits",
        "ENSEMBLE_MAX_ROWS_PER_REQUEST": str(MAX_ROWS), "ENSEMBLE_MAX_QUEUE_ROWS": str(MAX_QUEUE)})
    prometheus = None
    base, prom = service.base, f"http://127.0.0.1:{prom_port}"
    try:
        service.start(timeout=120)
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={scrape_config(service.port, tmp)}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for("prometheus ready", lambda: httpx.get(f"{prom}/-/ready", timeout=1).status_code == 200, 60, prometheus)

        rows = digits_test_split.x[:MAX_ROWS + 1].astype(int).tolist()
        stop = threading.Event()
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(send_load(base, rows, stop)))
        worker.start()
        time.sleep(8)
        # A published version that fails verification: a reload failure, digits/1 keeps serving.
        (repo / "digits" / "2").mkdir()
        (repo / "digits" / "2" / "manifest.json").write_text("{}")
        time.sleep(4)
        stop.set()
        worker.join(timeout=30)
        time.sleep(3)  # a few more scrapes and rule evaluations after the last request
        yield base, prom, result
    finally:
        for proc in (prometheus, service.proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def query(prom: str, expr: str) -> list:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body.get("status") == "success", f"{expr}: {body.get('error', body)}"
    return body["data"]["result"]


METRIC_NAME = re.compile(r"\b(ensemble_[a-z0-9_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b")


def missing_data(prom: str, named: list[tuple[str, str]]) -> list[str]:
    """Queries (and the metric names they mention) that return nothing, with where they come from."""
    problems = []
    for where, expr in named:
        try:
            if not query(prom, expr):
                problems.append(f"{where}: no data for {expr}")
        except AssertionError as exc:
            problems.append(f"{where}: {exc}")
        for name in sorted(set(METRIC_NAME.findall(expr))):
            if not query(prom, f'count({{__name__="{name}"}})'):
                problems.append(f"{where}: no series named {name}")
    return problems


def test_the_load_reached_every_status_the_queries_need(live):
    _, _, statuses = live
    for status in (200, 400, 404, 413, 422, 429, 504):
        assert statuses.get(status), f"no {status} among {statuses}"
    assert any(s >= 500 and s != 504 for s in statuses), statuses


def test_every_dashboard_query_returns_data(live):
    _, prom, _ = live
    named = [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
    named += [(f"variable ${name}", expr) for name, expr in dashboard_variable_queries()]
    assert len(named) > 20
    problems = missing_data(prom, named)
    assert not problems, "\n".join(problems)


def test_every_rule_expression_returns_data_and_evaluates_cleanly(live):
    _, prom, _ = live
    named = [(f"rule {r.get('alert') or r.get('record')}", without_filtering(r["expr"])) for r in rules()]
    problems = missing_data(prom, named)
    assert not problems, "\n".join(problems)
    groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r.get("alert") or r.get("record") for r in rules()}
    unhealthy = {name: r.get("lastError") for name, r in loaded.items() if r["health"] != "ok"}
    assert not unhealthy, unhealthy


def test_the_reload_failure_alert_fires_and_the_healthy_ones_do_not(live):
    _, prom, _ = live
    alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    names = {a["labels"]["alertname"] for a in alerts}
    assert "EnsembleReloadFailed" in names, alerts  # digits/2 and broken/1 failed to load
    assert not names & {"EnsembleNotReady", "EnsembleDisagreementRising", "EnsembleUncertaintyDrift"}, alerts


def test_promtool_check_metrics_reports_no_problems(live, promtool):
    base, _, _ = live
    text = httpx.get(f"{base}/metrics", timeout=10).text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        f"promtool check metrics:\n{result.stdout}{result.stderr}"
