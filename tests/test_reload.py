"""Hot reload, broken versions, memory, admin, restarts, overload, drain: a real uvicorn process
on a loopback port, real files, real load. Slow: `make test-slow`.

Figures are printed (`pytest -m slow -s tests/test_reload.py`) and copied into
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import orjson
import pytest

from contract.integrity import verify_checksums
from contract.layout import MANIFEST_FILE, scan_model
from contract.manifest import read_manifest
from tests.loadgen import Load
from tests.repo_tools import export_nan_member, manifest_as, publish_copy, publish_with_member
from tests.server import ServerProcess

pytestmark = pytest.mark.slow
TOKEN = "reload-test-admin-token"
CALM_SECONDS = 5  # the calm baseline taken before each reload of the latency test
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def body(digits_test_split) -> bytes:
    return orjson.dumps({"instances": digits_test_split.x[:1].tolist()})


@pytest.fixture()
def served(repository):
    server = ServerProcess(repository, env={"ENSEMBLE_ADMIN_TOKEN": TOKEN}).start()
    yield server
    server.kill()


def report(title: str, **figures) -> None:
    print(f"\n[figures] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def metric_values(base: str, name: str) -> dict[str, float]:
    """{label text: value} of one metric family in the exposition."""
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def span(windows: list[tuple[float, float]]) -> float:
    return sum(stop - start for start, stop in windows)


def open_files(server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def test_reload_under_load_drops_nothing_and_keeps_latency(served, repository, body):
    """20 versions published one after another under 16 busy connections: no request fails and
    the p99 while a version loads stays within twice the p99 without one. The calm baseline is
    taken in the same minutes as the reloads, a few seconds before each (an interleaved A/B):
    this shared machine's speed drifts by more than the target's margin over a few minutes, so
    a baseline taken once, before all the reloads, measured the drift as much as the reloads."""
    published = {1: 0.0}
    waits = []
    calm_windows, reload_windows = [], []
    rss_before, files_before = served.rss(), open_files(served)
    with Load(served.port, body, connections=16) as load:
        time.sleep(3)  # connections open, caches warm
        for _ in range(20):
            quiet = time.monotonic()
            time.sleep(CALM_SECONDS)
            started = time.monotonic()
            calm_windows.append((quiet, started))
            version = publish_copy(repository)
            published[version] = started
            waits.append(served.wait_live(version))
            reload_windows.append((started, time.monotonic()))
        time.sleep(1)
    result = load.result
    rss_growth = (served.rss() - rss_before) / 2**20
    assert result.statuses == {200: len(result.answers)}, (result.statuses, result.errors[:5])
    for a in result.answers:
        assert a.version in published, a
        assert published[a.version] <= a.started + a.latency, f"version {a.version} answered before it existed"
    calm, reloading = result.within(calm_windows), result.within(reload_windows)
    p99_calm, p99_reloading = calm.percentile(99) * 1000, reloading.percentile(99) * 1000
    durations = metric_values(served.base, "ensemble_model_reload_duration_seconds_sum")
    counts = metric_values(served.base, "ensemble_model_reload_duration_seconds_count")
    mean_reload = sum(durations.values()) / sum(counts.values())
    report("reload under load (16 connections, one-row /predict, 20 versions)",
           requests=len(result.answers),
           rate_calm=f"{len(calm.answers) / span(calm_windows):.0f}/s",
           rate_reloading=f"{len(reloading.answers) / span(reload_windows):.0f}/s",
           p50_calm_ms=f"{calm.percentile(50) * 1000:.1f}",
           p99_calm_ms=f"{p99_calm:.1f}", p50_reloading_ms=f"{reloading.percentile(50) * 1000:.1f}",
           p99_reloading_ms=f"{p99_reloading:.1f}", mean_reload_s=f"{mean_reload:.2f}",
           publish_to_live_s=f"{np.mean(waits):.2f} mean / {np.max(waits):.2f} max",
           rss_growth_mb=f"{rss_growth:.1f}", open_files=f"{files_before}->{open_files(served)}")
    assert len(reloading.answers) > 1000
    assert p99_reloading <= 2 * p99_calm, (p99_calm, p99_reloading)
    assert reloading.percentile(50) <= 2 * calm.percentile(50)
    assert rss_growth < 40, "20 reloads; 50 must stay under 100 MB"
    assert open_files(served) <= files_before + 4, "nothing of the loading processes is left open"


def test_broken_versions_are_never_served(served, repository, body, tmp_path):
    root = repository / "digits"
    good = root / "1"
    with Load(served.port, body, connections=2) as load:
        # (a) a version folder without a manifest
        (root / "2").mkdir()
        (root / "2" / "members").symlink_to(good / "members")
        # (b) a member file truncated after the manifest was written
        staging = root / ".staging-b"
        subprocess.run(["cp", "-r", str(good), str(staging)], check=True)
        (staging / MANIFEST_FILE).write_text(manifest_as(good, 3))
        member = read_manifest(good).members[0]
        victim = staging / member.path / "saved_model.pb"
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
        os.rename(staging, root / "3")
        # (c) the wrong input shape; (d) a member that answers NaN
        publish_copy(repository, edit=lambda raw: raw["input"].update(shape=[64]))
        publish_with_member(repository, export_nan_member(tmp_path / "nan"))
        # Each is tried (newest first, a child process compiling each) before the next step:
        # once (e) is complete and live, older versions are no longer candidates.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            states = {v["version"]: v["state"] for v in served.models()["versions"]}
            if all(states.get(n) in ("failed", "uncommitted") for n in (2, 3, 4, 5)):
                break
            time.sleep(0.5)
        assert served.models()["live"] == 1
        # (e) copied in slowly, file by file, the manifest first
        slow = root / "6"
        slow.mkdir()
        (slow / MANIFEST_FILE).write_text(manifest_as(good, 6))
        files = sorted(p for p in good.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
        states = []
        for i, src in enumerate(files):
            dst = slow / src.relative_to(good)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            time.sleep(0.3)
            if i < len(files) - 1:
                status = served.models()
                # GET /models answers from the last poll: a step before a poll saw 6 lists no 6
                states.append((status["live"], {v["version"]: v for v in status["versions"]}.get(6, {}).get("state")))
        partial_until = time.monotonic()
        served.wait_live(6)  # complete now: a good version, served
    detail = served.client.get("/models/digits/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    versions = {v["version"]: v for v in detail["versions"]}  # the reasons are the admins'
    assert "no manifest.json" in versions[2]["reason"]
    assert versions[3]["category"] == "checksum" and "mismatch" in versions[3]["reason"]
    assert versions[4]["category"] == "signature" and "manifest says [64]" in versions[4]["reason"]
    assert versions[5]["category"] == "warmup" and "non-finite" in versions[5]["reason"]
    assert all(live == 1 and state != "live" for live, state in states), states
    assert any(state == "failed" for _, state in states), states
    answers = load.result.answers
    assert {a.status for a in answers} == {200}
    assert {a.version for a in answers if a.started + a.latency < partial_until} == {1}
    failures = metric_values(served.base, "ensemble_model_reload_failures_total")
    for reason in ("uncommitted", "checksum", "signature", "warmup"):
        assert failures.get(f'{{model="digits",reason="{reason}"}}', 0) >= 1, (reason, failures)


def test_fifty_reloads_do_not_grow_memory(repository):
    # Loading at full speed and in the server's own thread: this test is about the server's
    # memory, and 50 child compilations would take ~10 minutes. In-thread loading does in the
    # server everything the default (a child compiles, the server imports) does there, and
    # restores the SavedModels on top; the default path's growth is measured by the test above.
    served = ServerProcess(repository, env={"ENSEMBLE_LOADER_DUTY_CYCLE": "1",
                                            "ENSEMBLE_ISOLATED_LOADING": "false"}).start()
    try:
        fifty_reloads(served, repository)
    finally:
        served.kill()


def fifty_reloads(served, repository):
    served.wait_live(publish_copy(repository))
    before = served.rss()
    for _ in range(50):
        served.wait_live(publish_copy(repository))
    time.sleep(1)
    after = served.rss()
    growth = (after - before) / 2**20
    report("memory over 50 reloads (5 members)", before_mb=f"{before / 2**20:.0f}",
           after_mb=f"{after / 2**20:.0f}", growth_mb=f"{growth:.1f}", per_reload_mb=f"{growth / 50:.2f}")
    assert growth < 100


def test_rollback_and_pin_over_http(served, repository, body):
    assert httpx.post(f"{served.base}/models/digits/rollback").status_code == 401
    v2 = publish_copy(repository)
    served.wait_live(v2)
    started = time.monotonic()
    resp = httpx.post(f"{served.base}/models/digits/rollback", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["live"] == 1
    first = httpx.post(f"{served.base}/predict", content=body).json()["model"]["version"]
    took = time.monotonic() - started
    report("rollback", seconds_until_served=f"{took:.3f}")
    assert first == 1 and took < 1.0
    v3 = publish_copy(repository)
    time.sleep(1)
    assert served.models()["live"] == 1, "pinned by the rollback"
    # Unpinning loads version 3 (a child process compiles it) before it answers.
    assert httpx.delete(f"{served.base}/models/digits/pin", headers=AUTH, timeout=120).json()["live"] == v3


def test_disabled_admin_routes_answer_403(repository):
    server = ServerProcess(repository).start()
    try:
        assert httpx.post(f"{server.base}/models/digits/rollback", headers=AUTH).status_code == 403
    finally:
        server.kill()


def test_kill_9_mid_load_then_restart_serves_the_last_good_version(repository, body):
    v2 = publish_copy(repository)
    server = ServerProcess(repository).start()
    server.wait_live(v2)
    with Load(server.port, body, connections=8):
        time.sleep(2)
        publish_copy(repository, edit=lambda raw: raw.pop("members"))  # broken v3
        server.proc.kill()
        server.proc.wait()
    again = ServerProcess(repository).start()
    try:
        resp = httpx.post(f"{again.base}/predict", content=body)
        assert resp.status_code == 200 and resp.json()["model"]["version"] == v2
        assert {v["version"]: v["state"] for v in again.models()["versions"]}[3] == "failed"
    finally:
        again.kill()


PUBLISHER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from contract.manifest import Manifest
    from training.publish import MemberArtifact, publish_version
    root, source = Path(sys.argv[1]), Path(sys.argv[2])
    m = Manifest.model_validate_json((source / "manifest.json").read_text())
    members = [MemberArtifact(e.name, e.kind, source / e.path, e.weight) for e in m.members]
    while True:
        publish_version(root, "digits", members, m.input, m.output, {})
""")


def test_kill_9_trainer_mid_publish_leaves_no_partial_version(served, repository, body, tmp_path):
    source = tmp_path / "source"
    subprocess.run(["cp", "-r", str(repository / "digits" / "1"), str(source)], check=True)
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    rng = random.Random(0)
    kills = 0
    with Load(served.port, body, connections=4) as load:
        for _ in range(12):
            proc = subprocess.Popen([sys.executable, str(script), str(repository), str(source)],
                                    env={**os.environ, "PYTHONPATH": os.getcwd()})
            time.sleep(rng.uniform(1.0, 3.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            for v in scan_model(repository, "digits"):  # every visible version is whole
                assert v.committed, f"version {v.version} visible without its manifest"
                verify_checksums(v.path, read_manifest(v.path))
    assert {a.status for a in load.result.answers} == {200}
    staging = [p.name for p in (repository / "digits").iterdir() if p.name.startswith(".")]
    report("trainer killed mid-publish", kills=kills,
           versions=len(scan_model(repository, "digits")), staging_left=len(staging))


def histogram_quantile(base: str, name: str, q: float) -> float:
    """The upper bound of the bucket holding quantile q of a label-less histogram."""
    buckets = sorted((float(k.split('"')[1]), v) for k, v in metric_values(base, f"{name}_bucket").items())
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= q * total)


def test_overload_refuses_fast_and_recovers(repository, body):
    server = ServerProcess(repository, env={"ENSEMBLE_MAX_QUEUE_ROWS": "24", "ENSEMBLE_MAX_ROWS_PER_REQUEST": "24"}).start()
    try:
        with Load(server.port, body, connections=96) as load:
            time.sleep(10)
        result = load.result
        ok = [a.latency for a in result.answers if a.status == 200]
        refused = [a.latency for a in result.answers if a.status == 429]
        assert set(result.statuses) <= {200, 429}, (result.statuses, result.errors[:3])
        p99_ok, p99_refused = np.percentile(ok, 99) * 1000, np.percentile(refused, 99) * 1000
        queue_wait_p99 = histogram_quantile(server.base, "ensemble_queue_wait_seconds", 0.99) * 1000
        after = []
        with httpx.Client(base_url=server.base) as client:
            for _ in range(50):
                started = time.monotonic()
                resp = client.post("/predict", content=body)
                after.append((resp.status_code, time.monotonic() - started))
        report("overload (96 connections, queue bound 24 rows)", answered=len(ok), refused=len(refused),
               p50_answered_ms=f"{np.median(ok) * 1000:.1f}", p99_answered_ms=f"{p99_ok:.1f}",
               p50_refused_ms=f"{np.median(refused) * 1000:.1f}", p99_refused_ms=f"{p99_refused:.1f}",
               queue_wait_p99_ms=f"<={queue_wait_p99:g}", p50_after_ms=f"{np.median([t for _, t in after]) * 1000:.1f}")
        assert refused and ok
        assert np.median(refused) < np.median(ok), "a refusal must not wait like an answer"
        assert queue_wait_p99 <= 50, "the bound keeps the wait of admitted requests short"
        assert p99_ok < 500
        assert {s for s, _ in after} == {200}
        assert np.median([t for _, t in after]) < 0.03, "recovered once the load is gone"
        refusals = metric_values(server.base, "ensemble_rejected_requests_total")
        assert refusals['{reason="queue_full"}'] == len(refused)
    finally:
        server.kill()


def test_sigterm_drains_what_was_received(repository, digits_test_split):
    server = ServerProcess(repository).start()
    big = orjson.dumps({"instances": digits_test_split.x[:256].tolist()})
    # 6 x 256 rows stay under the default queue bound (4096 rows): every request is admitted.
    with Load(server.port, big, connections=6) as load:
        time.sleep(2)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        exited = time.monotonic()
    before = [a for a in load.result.answers if a.started < signalled]
    report("drain on SIGTERM (6 connections of 256-row requests)", answered_before_signal=len(before),
           exit_seconds=f"{exited - signalled:.2f}")
    # uvicorn re-raises the SIGTERM it caught once its shutdown is complete (exit by signal 15,
    # what a supervisor expects); an exit code of its own would mean a crash.
    assert code in (0, -signal.SIGTERM)
    assert exited - signalled < 10
    assert before and {a.status for a in before} == {200}, [a for a in before if a.status != 200][:3]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base}/healthz", timeout=2)


def test_fuzzing_the_openapi_schema_finds_no_500_and_no_hang(served, tmp_path):
    st = os.path.join(os.path.dirname(sys.executable), "st")
    run = subprocess.run(
        [st, "run", f"{served.base}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--request-timeout", "10", "--workers", "1", "--seed", "1",
         "--generation-database", "none", "--no-color", "-H", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    tail = run.stdout[-4000:]
    print(tail)
    assert run.returncode == 0, tail
    assert httpx.get(f"{served.base}/healthz").status_code == 200
    paths = json.loads(httpx.get(f"{served.base}/openapi.json").text)["paths"]
    assert len(paths) >= 18
