"""The deployment files: checked statically in the fast suite, and for real in a container run.

Fast (every `make test`): the Kubernetes manifests and the compose file parse and agree with the
service (probe paths are routes, ports match, grace periods exceed the drain, the repository is
read-only for the api); `docker-compose config -q` and `kubectl kustomize` when installed.

Slow (`make test-container`, which sets ENSEMBLE_CONTAINER_TESTS=1; `make test-slow` skips them
so CI does not build twice): builds the image with podman on the local stand-in for
python:3.11-slim (../shared/tools/container-base-image.sh), runs the trainer container to
publish a tiny version into a volume, runs the api container on it and predicts over HTTP; then
brings up `api` and `trainer` with podman-compose on an empty volume (the trainer seeds it) and
predicts from the compose api.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.deploy_checks import (
    PROMETHEUS_DIR,
    COMPOSE_FILE,
    KUBERNETES_DIR,
    ROOT,
    ensure_debian_packages,
    yaml_documents,
)

TOOLS = ROOT.parent / "shared" / "tools"
IMAGE = "ensemble-serving:test"
# A training of seconds: one random-search trial of one epoch, one member of two epochs (allowed
# below --min-members).
TINY_TRAINING = ["--tuner", "random", "--max-trials", "1", "--max-epochs", "1", "--members", "seed:1",
                 "--allow-fewer", "--epochs", "2", "--patience", "1"]


# -- static checks (fast suite) -------------------------------------------------------------


def all_manifests() -> list[dict]:
    """Every Kubernetes object of every file kustomization.yaml lists."""
    kustomization = yaml_documents(KUBERNETES_DIR / "kustomization.yaml")[0]
    objects = []
    for name in kustomization["resources"]:
        for doc in yaml_documents(KUBERNETES_DIR / name):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{name}: {sorted(doc)}"
            objects.append(doc)
    return objects


def manifests() -> dict[str, dict]:
    """Kubernetes objects by kind (the first of each kind: the repository's claim comes first)."""
    objects: dict[str, dict] = {}
    for doc in all_manifests():
        objects.setdefault(doc["kind"], doc)
    return objects


def compose() -> dict:
    return yaml_documents(COMPOSE_FILE)[0]


def service_routes() -> set[str]:
    """Paths the service answers with GET (FastAPI's routes; no TensorFlow is imported)."""
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings())
    return {r.path for r in app.app.routes if "GET" in getattr(r, "methods", ())}


def test_kustomization_lists_every_manifest_and_each_parses():
    listed = set(yaml_documents(KUBERNETES_DIR / "kustomization.yaml")[0]["resources"])
    on_disk = {p.name for p in KUBERNETES_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert set(manifests()) == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service",
                                "HorizontalPodAutoscaler", "CronJob", "Job", "NetworkPolicy"}


# The Kubernetes versions the manifests are validated for: the releases kubernetes-validate has
# schemas of that are still maintained or recent (1.31 brought backoffLimitPerIndex to beta).
KUBERNETES_VERSIONS = ("1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(version):
    """kubernetes-validate --strict: every field known to that version's API, none missing."""
    validate = pytest.importorskip("kubernetes_validate")
    for name in yaml_documents(KUBERNETES_DIR / "kustomization.yaml")[0]["resources"]:
        for doc in yaml_documents(KUBERNETES_DIR / name):
            try:
                validate.validate(doc, version, strict=True)
            except validate.ValidationError as exc:
                pytest.fail(f"{name} ({doc['kind']}) is not valid for Kubernetes {version}: {exc}")


def image_grpc_port() -> int:
    """The gRPC port the image sets (ENSEMBLE_GRPC_PORT in the Dockerfile)."""
    import re

    return int(re.search(r"ENSEMBLE_GRPC_PORT=(\d+)", (ROOT / "Dockerfile").read_text()).group(1))


def test_deployment_probes_and_scrape_path_are_routes_of_the_service():
    from service.config import Settings

    pod = manifests()["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    routes = service_routes()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    paths = [container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")]
    paths.append(pod["metadata"]["annotations"]["prometheus.io/path"])
    assert set(paths) <= routes, set(paths) - routes
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": Settings().port, "grpc": image_grpc_port()}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(Settings().port)


def test_termination_grace_outlasts_endpoint_removal_and_the_drain():
    from service.config import Settings

    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env.get("ENSEMBLE_SHUTDOWN_GRACE_SECONDS") or Settings().shutdown_grace_seconds)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    api = compose()["services"]["api"]
    assert int(re.fullmatch(r"(\d+)s", api["stop_grace_period"]).group(1)) > Settings().shutdown_grace_seconds


def test_repository_is_shared_read_only_by_the_api_and_written_by_the_jobs():
    objects = manifests()
    assert objects["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = objects["PersistentVolumeClaim"]["metadata"]["name"]
    api = objects["Deployment"]["spec"]["template"]["spec"]
    assert api["volumes"][0]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    assert api["containers"][0]["volumeMounts"][0] == {"name": "models", "mountPath": "/models", "readOnly": True}
    cron = objects["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    for job in (cron["jobTemplate"]["spec"]["template"]["spec"], objects["Job"]["spec"]["template"]["spec"]):
        assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
        assert not job["containers"][0]["volumeMounts"][0].get("readOnly")
        assert "/models" in job["containers"][0]["args"]
    assert "--if-empty" in objects["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    service = objects["Service"]["spec"]
    assert service["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]


def test_the_api_pods_are_locked_down_and_share_their_pins():
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not mounts["/state"].get("readOnly") and env["ENSEMBLE_STATE_DIR"] == "/state"
    state_claim = volumes[mounts["/state"]["name"]]["persistentVolumeClaim"]["claimName"]
    claims = {d["metadata"]["name"]: d for d in all_manifests() if d["kind"] == "PersistentVolumeClaim"}
    assert claims[state_claim]["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica reads the pins
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the compile child's files on a read-only root
    assert env["ENSEMBLE_COMPILE_CACHE_DIR"].startswith("/tmp/")
    assert next(e for e in container["env"] if e["name"] == "ENSEMBLE_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": p["containerPort"]} for p in container["ports"]]}]
    assert policy["egress"] == [] and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    for job in (objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                objects["Job"]["spec"]["template"]["spec"]):
        assert job["automountServiceAccountToken"] is False


def test_compose_services_are_locked_down_and_listen_on_loopback():
    services = compose()["services"]
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    for name in ("api", "trainer", "prometheus", "grafana"):
        assert services[name]["mem_limit"] and services[name]["cpus"], name
    assert not any("enable-lifecycle" in arg for arg in services["prometheus"]["command"])
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_DISABLE_LOGIN_FORM"] == "${GRAFANA_LOGIN_DISABLED:-true}"
    assert grafana["GF_AUTH_BASIC_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana  # no default password to guess


def test_prometheus_scrapes_every_api_replica_of_compose():
    """`--scale api=N`: Prometheus finds the replicas by the service's name in compose's DNS, on
    the port the api listens on, at the path the service answers; nothing fixes one container."""
    from service.config import Settings

    config = yaml_documents(PROMETHEUS_DIR / "prometheus.yml")[0]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ensemble-serving"]
    assert "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["api"] and "api" in compose()["services"]
    assert sd["type"] == "A" and sd["port"] == Settings().port
    assert job["metrics_path"] in service_routes()
    api = compose()["services"]["api"]
    assert "container_name" not in api and "hostname" not in api  # both would stop --scale


def test_compose_api_reads_the_volume_the_trainer_seeds_and_schedules():
    services = compose()["services"]
    assert "models:/models:ro" in services["api"]["volumes"]
    assert "models:/models" in services["trainer"]["volumes"]
    trainer = " ".join(services["trainer"]["command"])
    assert "ensemble-train schedule" in trainer and "--initial-run if-empty" in trainer
    assert services["api"]["image"] == services["trainer"]["image"]
    tune = {name for name, s in services.items() if "tune" in s.get("profiles", [])}
    assert tune == {"tune-chief", "tune-worker-0", "tune-worker-1"}
    ids = {services[n]["environment"]["KERASTUNER_TUNER_ID"] for n in tune}
    assert ids == {"chief", "tuner0", "tuner1"}


def test_compose_file_is_valid_for_docker_compose():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose); the container test installs it")
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_kustomization_builds():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed; the manifests were checked as YAML only")
    result = subprocess.run(["kubectl", "kustomize", str(KUBERNETES_DIR)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("image: ensemble-serving:") == 3


# -- the image, for real (make test-container) -----------------------------------------------

needs_containers = pytest.mark.skipif(
    os.environ.get("ENSEMBLE_CONTAINER_TESTS") != "1",
    reason="container tests run with `make test-container` (ENSEMBLE_CONTAINER_TESTS=1)")


def flags(kind: str) -> list[str]:
    return subprocess.run([str(TOOLS / "podman-flags.sh"), kind], capture_output=True, text=True,
                          check=True).stdout.split()


def sh(cmd: list[str], env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> dict:
    """The environment for podman: tools present, base image imported, runtime runc."""
    if not (TOOLS / "container-base-image.sh").exists():
        pytest.skip(f"{TOOLS}/container-base-image.sh is absent: it builds the stand-in for "
                    "python:3.11-slim that podman needs on a machine that cannot pull images")
    reason = ensure_debian_packages({"podman": "podman", "runc": "runc", "debootstrap": "debootstrap",
                                     "docker-compose": "docker-compose"})
    if reason:
        pytest.skip(reason)
    # crun (podman's default runtime) refuses this machine's hybrid cgroup v1/v2 layout
    # ("cgroups in hybrid mode not supported"); runc runs on it.
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    sh([str(TOOLS / "container-base-image.sh")], env, timeout=1200)
    return env


@pytest.fixture(scope="module")
def image(podman) -> str:
    started = time.monotonic()
    sh(["podman", "build", "--format", "docker", *flags("build"), "-t", IMAGE, "-t", "ensemble-serving:latest",
        str(ROOT)], podman, timeout=1800)
    size = sh(["podman", "image", "inspect", IMAGE, "--format", "{{.Size}}"], podman).stdout.strip()
    print(f"\n[container] image built in {time.monotonic() - started:.0f} s, {int(size) / 1e9:.2f} GB")
    return IMAGE


@pytest.fixture()
def volume(podman):
    name = f"ensemble-test-{uuid.uuid4().hex[:8]}"
    sh(["podman", "volume", "create", name], podman)
    yield name
    sh(["podman", "volume", "rm", "-f", name], podman, check=False)


def container_logs(name: str, env: dict) -> str:
    result = sh(["podman", "logs", name], env, check=False)
    return result.stdout + result.stderr


def wait_ready(base: str, timeout: float, logs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"{base} not ready within {timeout:.0f} s:\n{logs()[-4000:]}")


def predict_one(base: str, digits_test_split) -> dict:
    resp = httpx.post(f"{base}/predict", json={"instances": digits_test_split.x[:3].astype(int).tolist()}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == {"name": "digits", "version": 1}
    assert len(body["predictions"]) == 3 and all(len(row) == 10 for row in body["predictions"])
    return body


@pytest.mark.slow
@needs_containers
@pytest.mark.usefixtures("image")
def test_trainer_container_publishes_and_api_container_serves_it(podman, volume, digits_test_split):
    run = ["podman", "run", *flags("run")]
    started = time.monotonic()
    trained = sh([*run, "--rm", "--no-healthcheck", "-v", f"{volume}:/models", IMAGE,
                  "ensemble-train", "--data", "digits", "--name", "digits", "--repository", "/models",
                  *TINY_TRAINING], podman, timeout=900)
    assert "[publish] digits version 1" in trained.stdout, trained.stdout[-3000:]
    print(f"\n[container] trainer container published version 1 in {time.monotonic() - started:.0f} s")

    port, name = free_port(), f"ensemble-api-{uuid.uuid4().hex[:8]}"
    sh([*run, "-d", "--name", name, "-v", f"{volume}:/models:ro", "-p", f"127.0.0.1:{port}:8000", IMAGE], podman)
    try:
        started = time.monotonic()
        wait_ready(f"http://127.0.0.1:{port}", 180, lambda: container_logs(name, podman))
        print(f"[container] api container ready in {time.monotonic() - started:.0f} s")
        predict_one(f"http://127.0.0.1:{port}", digits_test_split)
        # The image's HEALTHCHECK, run by hand (podman schedules it through systemd, absent here).
        assert sh(["podman", "healthcheck", "run", name], podman, check=False).returncode == 0
        assert sh(["podman", "exec", name, "id", "-u"], podman).stdout.strip() == "10001"
        tools = sh(["podman", "exec", name, "sh", "-c", "command -v gcc cc make || true"], podman).stdout
        assert tools.strip() == "", f"build tools in the final image: {tools}"
        # SIGTERM: uvicorn drains and exits well before the 40 s we allow.
        started = time.monotonic()
        sh(["podman", "stop", "-t", "40", name], podman)
        assert time.monotonic() - started < 35
        logs = container_logs(name, podman)
        assert "Finished server process" in logs, logs[-2000:]
    finally:
        sh(["podman", "rm", "-f", name], podman, check=False)


@pytest.mark.slow
@needs_containers
@pytest.mark.usefixtures("image")
def test_compose_trainer_seeds_the_empty_volume_and_the_api_serves_it(podman, digits_test_split, tmp_path):
    assert sh(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"], podman).returncode == 0
    exe = Path(sys.executable).parent / "podman-compose"
    if not exe.exists():
        sh([sys.executable, "-m", "pip", "install", "--quiet", "podman-compose"], podman, timeout=300)
    project, port = f"enstest{uuid.uuid4().hex[:6]}", free_port()
    env = {**podman, "API_PORT": str(port), "TRAIN_ARGS": " ".join(TINY_TRAINING), "RETRAIN_EVERY": "6h"}
    compose_cmd = [str(exe), "-f", str(COMPOSE_FILE), "-p", project, "--in-pod", "false",
                   f"--podman-run-args={' '.join(flags('run'))}"]

    def logs() -> str:
        out = sh([*compose_cmd, "logs", "api", "trainer"], env, check=False)
        return out.stdout + out.stderr

    started = time.monotonic()
    try:
        sh([*compose_cmd, "up", "-d", "api", "trainer"], env, timeout=300)
        wait_ready(f"http://127.0.0.1:{port}", 600, logs)
        print(f"\n[container] compose: trainer seeded the volume and the api was ready in "
              f"{time.monotonic() - started:.0f} s")
        predict_one(f"http://127.0.0.1:{port}", digits_test_split)
        trainer = logs()
        assert "first run now" in trainer and "run 1 succeeded" in trainer, trainer[-3000:]
    finally:
        sh([*compose_cmd, "down", "-v", "-t", "10"], env, timeout=300, check=False)


@pytest.mark.slow
@needs_containers
@pytest.mark.usefixtures("image")
def test_compose_tune_profile_spreads_the_search_over_two_workers_and_the_chief_publishes(podman):
    exe = Path(sys.executable).parent / "podman-compose"
    if not exe.exists():
        sh([sys.executable, "-m", "pip", "install", "--quiet", "podman-compose"], podman, timeout=300)
    project = f"enstune{uuid.uuid4().hex[:6]}"
    env = {**podman, "TUNE_ARGS": "--tuner random --max-trials 3 --max-epochs 1 --members tuned:2 --epochs 1 --patience 1"}
    compose_cmd = [str(exe), "-f", str(COMPOSE_FILE), "-p", project, "--in-pod", "false",
                   f"--podman-run-args={' '.join(flags('run'))}", "--profile", "tune"]
    started = time.monotonic()
    try:
        # In the foreground: returns when the chief and both workers have exited.
        out = sh([*compose_cmd, "up", "tune-chief", "tune-worker-0", "tune-worker-1"], env, timeout=900)
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # the per-container colours
        print(f"\n[container] compose tune profile finished in {time.monotonic() - started:.0f} s")
        for worker in ("tune-worker-0", "tune-worker-1"):
            lines = [line for line in text.splitlines() if worker in line]
            assert any("this worker is done" in line for line in lines), text[-3000:]
        trials = len(re.findall(r"\[tune-worker-\d\]\s*\|\s*\[tune\] trial \d+ done", text))
        assert trials == 3, text[-3000:]
        assert "[publish] digits version 1 with 2 members" in text, text[-3000:]
    finally:
        sh([*compose_cmd, "down", "-v", "-t", "10"], env, timeout=300, check=False)
