"""The report where people look: the report routes and /ui through the app, /docs on local
assets; and (slow) both pages in a real headless Chromium against a real server."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tempfile

import pytest

from tests.deploy_checks import ensure_debian_packages


def test_report_route_serves_the_versions_report_without_paths(client, repository):
    path = repository / "digits" / "1" / "report.json"
    on_disk = json.loads(path.read_text())
    on_disk["data"]["source"] = "/srv/private/datasets/cancer.csv"  # as a CSV run writes it
    path.write_text(json.dumps(on_disk))
    resp = client.get("/models/digits/versions/1/report")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    report = resp.json()
    assert report["versus_selected_member"] == on_disk["versus_selected_member"]
    assert report["calibration"]["temperature"] == on_disk["calibration"]["temperature"]
    assert report["data"]["source"] == "cancer.csv" and "/srv" not in resp.text


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"null"])
def test_a_report_that_is_not_a_json_object_is_a_404(client, repository, content):
    (repository / "digits" / "1" / "report.json").write_bytes(content)
    resp = client.get("/models/digits/versions/1/report")
    assert resp.status_code == 404 and "not a report" in resp.json()["error"]


def test_a_version_folder_that_is_a_link_is_not_served(client, repository):
    (repository / "digits" / "2").symlink_to(repository / "digits" / "1")
    assert client.get("/models/digits/versions/2/report").status_code == 404
    assert client.get("/models/digits/versions/2/report/metrics.png").status_code == 404


def test_report_pictures_are_served_by_name_only(client, repository):
    for name in ("reliability.png", "metrics.png", "risk_coverage.png"):
        resp = client.get(f"/models/digits/versions/1/report/{name}")
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert resp.content == (repository / "digits" / "1" / name).read_bytes()
    (repository / "digits" / "1" / "secret.png").symlink_to("/etc/hostname")
    for bad, status in (("manifest.json", 404), ("..%2Fmanifest.json", 404), ("secret.png", 404),
                        ("ood.png", 404), ("Reliability.PNG", 404)):
        resp = client.get(f"/models/digits/versions/1/report/{bad}")
        assert resp.status_code == status, bad
        assert "error" in resp.json()
    assert client.get("/models/digits/versions/7/report").status_code == 404
    assert client.get("/models/Nope/versions/1/report").status_code == 404
    assert client.get("/models/digits/versions/0/report").status_code == 422


def test_a_report_that_is_a_link_is_refused(client, repository):
    report = repository / "digits" / "1" / "report.json"
    report.rename(repository / "elsewhere.json")
    report.symlink_to(repository / "elsewhere.json")
    resp = client.get("/models/digits/versions/1/report")
    assert resp.status_code == 404 and "has no report.json" in resp.json()["error"]


def test_ui_is_one_page_without_external_assets(client):
    resp = client.get("/ui")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert "<script>" in page and "/models" in page and "/report" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from another host
    policy = resp.headers["content-security-policy"]
    assert policy.startswith("default-src 'none'; script-src 'sha256-") and "'unsafe-inline'" not in policy
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1).encode()
    assert base64.b64encode(hashlib.sha256(script).digest()).decode() in policy  # its own script only


def test_docs_load_swagger_ui_from_the_server_itself(client):
    page = client.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "/openapi.json" in page
    assert "cdn" not in page.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        resp = client.get(f"/docs/assets/{asset}")
        assert resp.status_code == 200 and len(resp.content) > 10_000
    assert client.get("/redoc").status_code == 404  # it would need a CDN: not offered


# -- in a real browser ---------------------------------------------------------------------------

def chromium() -> str:
    reason = ensure_debian_packages({"chromium": "chromium"})
    if reason:
        pytest.skip(reason)
    return shutil.which("chromium")


def browse(url: str, *extra: str) -> str:
    """The page's DOM after its scripts ran (headless Chromium, 10 s of virtual time)."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_ui_and_docs_render_in_headless_chromium(repository, tmp_path):
    from tests.server import ServerProcess

    server = ServerProcess(repository).start()
    try:
        dom = browse(f"{server.base}/ui", "--dump-dom")
        assert 'data-ready="yes"' in dom, dom[-2000:]
        assert 'data-live="1"' in dom and "live: version 1" in dom
        assert "the member chosen on validation" in dom and "95% interval" in dom
        for picture in ("reliability.png", "risk_coverage.png", "metrics.png"):
            assert re.search(rf'data-file="{picture}"[^>]*data-loaded="yes"|data-loaded="yes"[^>]*data-file="{picture}"',
                             dom), f"{picture} did not load:\n{dom[-3000:]}"
        shot = tmp_path / "ui.png"
        browse(f"{server.base}/ui", f"--screenshot={shot}", "--window-size=1280,1800")
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000

        docs = browse(f"{server.base}/docs", "--dump-dom")
        assert 'class="swagger-ui"' in docs and "opblock" in docs, docs[-2000:]
        assert "/predict" in docs and "/v2/models/{name}/infer" in docs
        browse(f"{server.base}/docs", f"--screenshot={tmp_path / 'docs.png'}", "--window-size=1280,1800")
        assert (tmp_path / "docs.png").stat().st_size > 20_000
        print(f"[figures] screenshots in {tmp_path}")
    finally:
        server.kill()


def test_a_pipe_or_an_oversized_file_is_refused_without_blocking(client, repository, tmp_path):
    import os

    from contract.files import read_nofollow

    report = repository / "digits" / "1" / "report.json"
    report.unlink()
    os.mkfifo(report)  # opening it to read would wait forever for a writer
    resp = client.get("/models/digits/versions/1/report")
    assert resp.status_code == 404 and "has no report.json" in resp.json()["error"]
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    assert read_nofollow(big, 2048) == b"x" * 2048
    with pytest.raises(OSError, match="larger than 1024 bytes"):
        read_nofollow(big, 1024)
