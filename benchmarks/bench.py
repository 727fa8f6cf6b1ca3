"""The serving benchmark: this service against the usual way, the HTTP floor, the raw in-process
rate and LitServe, on the same 5-member ensemble, loaded by wrk on loopback; then the same
service over gRPC (benchmarks/grpc_load.py, with the load generator's own ceiling), and a heavy
ensemble beside the small one (benchmarks/heavy_model.py: 10 convolutional members on 32x32x3),
each figure of the two side by side.

    python benchmarks/bench.py --repository models --name digits [--duration 10] [--only grpc,heavy]
    python benchmarks/bench.py --smoke --only grpc,heavy,ceiling   # 1 s per figure, to a temporary file

Writes the tables to benchmarks/RESULTS.md (and prints them).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

import grpc_load
import heavy_model
from grpc_load import GrpcLoad

HERE = Path(__file__).resolve().parent
HISTORY_MARKER = "<!-- history: kept by bench.py -->"
ROOT = HERE.parent
SERVERS = ("ours", "ours2", "usual", "bare", "litserve")
# The figures that grow the work: gRPC on the small ensemble, the heavy ensemble, the gRPC load
# generator's own ceiling.
GROWN = ("grpc", "heavy", "ceiling")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total / 1024


@dataclass
class Load:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, body: bytes, connections: int, duration: float, content_type: str = "application/json",
        header_length: int | None = None, timeout: str = "5s") -> Load:
    """Run wrk against url with one body; parse rate, p50, p99 and errors."""
    with tempfile.NamedTemporaryFile(suffix=".body", delete=False) as f:
        f.write(body)
    env = {**os.environ, "BODY_FILE": f.name, "CONTENT_TYPE": content_type,
           "HEADER_LENGTH": "" if header_length is None else str(header_length)}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", timeout, "--latency",
         "-s", str(HERE / "post.lua"), url], capture_output=True, text=True, env=env, check=True).stdout
    os.unlink(f.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Load(rate, p50, p99, errors + (int(non2xx.group(1)) if non2xx else 0))


class Server:
    """A server process on a free loopback port, ready once `ready_path` answers 200."""

    def __init__(self, name: str, argv: list[str], ready_path: str, predict_path: str, env=None,
                 cwd: Path = ROOT, ready_timeout: float = 180):
        self.name, self.port, self.grpc_port, self.cwd = name, free_port(), free_port(), cwd
        self.argv = [a.replace("{port}", str(self.port)).replace("{grpc_port}", str(self.grpc_port)) for a in argv]
        self.ready_timeout = ready_timeout
        self.ready_path, self.predict_path = ready_path, predict_path
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "Server":
        self.log = open(HERE / f".{self.name}.log", "w")
        # A session of its own, so stopping it stops its worker processes too (LitServe forks).
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.cwd, start_new_session=True)
        import urllib.request

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see benchmarks/.{self.name}.log")
            try:
                with urllib.request.urlopen(self.url(self.ready_path), timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not become ready in {self.ready_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def raw_rates(version_dir: Path, seconds: float = 3.0,
              lite_threads: int = 1) -> dict[str, dict[int, tuple[float, float]]]:
    """The ensemble as the service runs it, called in-process on one thread, by engine:
    {"tflite": {batch: (rows per second, ms per call)}, "tensorflow": {...}}. "tflite" is what
    the service computes with (absent if this version does not convert); "tensorflow" is the
    frozen graph's function (TensorFlow's default thread pools). With `lite_threads` > 1, also
    "tflite xN": one call on N interpreter threads (the server's default on an N-core machine)."""
    from service.engines.compile import compile_version
    from service.engines.lite import load_lite
    from service.engines.tensorflow import import_frozen
    from contract.manifest import read_manifest

    manifest = read_manifest(version_dir)
    compiled = compile_version(manifest, version_dir)
    ensemble = import_frozen(manifest, version_dir, compiled.frozen, (1, 32, 256))
    engines = {"tensorflow": ensemble.engine.run}
    if compiled.lite is not None:
        if lite_threads > 1:
            wide = load_lite(manifest, version_dir, compiled.lite, (1, 32, 256), threads=lite_threads)
            engines = {f"tflite x{lite_threads}": wide.engine.run, **engines}
        ensemble = load_lite(manifest, version_dir, compiled.lite, (1, 32, 256))
        engines = {"tflite": ensemble.engine.run, **engines}
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for engine, run in engines.items():
        out[engine] = {}
        for batch in (1, 32, 256):
            x = rng.uniform(0, 16, (batch, *ensemble.input_spec.shape)).astype("float32")
            warm = time.perf_counter()
            for _ in range(20):  # at most `seconds` of it: a heavy ensemble's batch-256 call takes about one
                run(x)
                if time.perf_counter() - warm > seconds:
                    break
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                run(x)
                calls += 1
            per_call = (time.perf_counter() - started) / calls
            out[engine][batch] = (batch / per_call, per_call * 1000)
    return out


def sample_rows(shape: tuple[int, ...], rows: int) -> np.ndarray:
    """`rows` digits-like rows (whole numbers 0..16 as float32) of an input shape."""
    return np.random.default_rng(1).integers(0, 17, (rows, *shape)).astype("float32")


def bodies(shape: tuple[int, ...], rows: int) -> tuple[bytes, bytes, int]:
    """(JSON body, V2 binary body, its JSON header length) for `rows` digits-like rows."""
    x = sample_rows(shape, rows)
    json_body = orjson.dumps({"instances": x.astype(int).tolist()})
    head = orjson.dumps({"inputs": [{"name": "instances", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]})
    return json_body, head + x.astype("<f4").tobytes(), len(head)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--name", default="digits")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    p.add_argument("--only", default=",".join(SERVERS + GROWN),
                   help="parts to run, comma-separated: the HTTP servers under wrk (ours, ours2, usual, bare, "
                        "litserve); grpc (the small ensemble on one server with --grpc-port: gRPC and HTTP "
                        "figures, memory per member, publish-to-live); heavy (the same for the heavy ensemble, "
                        "and its raw rate); ceiling (the gRPC load generator against a server that does "
                        "nothing). Default: all")
    p.add_argument("--grpc-processes", type=int, default=2, help="processes of the gRPC load generator. Default: 2")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds of each raw in-process timing. Default: 3")
    p.add_argument("--smoke", action="store_true",
                   help="check that every part runs: 1 s per figure, short raw timings, results written to a "
                        "temporary file unless --out is given (the figures are not worth keeping)")
    p.add_argument("--out", type=Path, default=None, help="Default: benchmarks/RESULTS.md")
    args = p.parse_args()
    only = set(args.only.split(","))
    if only - set(SERVERS) - set(GROWN):
        p.error(f"--only: unknown parts {sorted(only - set(SERVERS) - set(GROWN))}; "
                f"choose from {', '.join(SERVERS + GROWN)}")
    if args.smoke:
        args.duration, args.raw_seconds = 1.0, min(args.raw_seconds, 0.3)
        args.out = args.out or Path(tempfile.gettempdir()) / "bench-smoke-RESULTS.md"
    args.out = args.out or HERE / "RESULTS.md"

    from contract.layout import scan_model
    from contract.manifest import read_manifest

    committed = [v for v in scan_model(args.repository, args.name) if v.committed]
    if not committed:
        print(f"no published version of {args.name} in {args.repository}; run `make train` first", file=sys.stderr)
        return 2
    vdir = committed[-1].path
    manifest = read_manifest(vdir)
    shape = manifest.input.shape
    one, _, _ = bodies(shape, 1)
    many, many_binary, many_header = bodies(shape, 256)
    d = args.duration
    print(f"ensemble {manifest.name} v{manifest.version}: {len(manifest.members)} members", flush=True)

    # The figures that grow the work also compare with one call on all the cores, as the server runs it.
    raw_by_engine = raw_rates(vdir, args.raw_seconds, os.cpu_count() if "grpc" in only else 1)
    print_raw(raw_by_engine)

    py = sys.executable
    ours = [py, "-m", "service.cli", "--repository", str(args.repository), "--port", "{port}",
            "--default-model", args.name, "--log-level", "warning"]
    servers = {
        "ours": Server("ours", ours, "/readyz", "/predict"),
        "ours2": Server("ours2", [*ours, "--workers", "2"], "/readyz", "/predict"),
        "usual": Server("usual", [py, str(HERE / "usual_server.py"), str(vdir), "{port}"], "/ready", "/predict"),
        "bare": Server("bare", [py, str(HERE / "bare_server.py"), "{port}"], "/ready", "/predict"),
        "litserve": Server("litserve", [py, str(HERE / "litserve_server.py"), str(vdir), "{port}"], "/ready", "/predict"),
    }
    results: dict[str, dict] = {}
    for key, server in servers.items():
        if key not in only:
            continue
        with server:
            url = server.url(server.predict_path)
            wrk(url, one, 4, 1 if args.smoke else 2)  # warm-up
            r: dict = {"c1": wrk(url, one, 1, d), "c32": wrk(url, one, 32, d)}
            if key != "usual":  # the usual way at 256 rows is measured at 1 connection below
                r["json256"] = wrk(url, many, 4, d)
            else:
                r["json256"] = wrk(url, many, 1, d)
            if key.startswith("ours"):
                r["bin256"] = wrk(server.url(f"/v2/models/{args.name}/infer"), many_binary, 4, d,
                                  "application/octet-stream", many_header)
            r["rss_mb"] = rss_mb(server.proc.pid)
            results[key] = r
            print(key, {k: (v.__dict__ if isinstance(v, Load) else v) for k, v in r.items()}, flush=True)

    grown: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        if "grpc" in only:  # the small ensemble, copied: publish-to-live must not touch --repository
            repository = work / "small"
            shutil.copytree(vdir, repository / manifest.name / vdir.name)
            grown["small"] = served_figures("small", repository, manifest, reference(raw_by_engine),
                                            [vdir / m.path for m in manifest.members], args)
            grown["small"]["raw"] = raw_by_engine
        if "heavy" in only:
            repository = work / "heavy"
            import_v1 = heavy_model.publish_heavy(repository, "heavy")
            hdir = next(v.path for v in scan_model(repository, "heavy") if v.committed)
            heavy = read_manifest(hdir)
            print(f"heavy: published {len(heavy.members)} members in {import_v1:.1f} s", flush=True)
            raw_heavy = raw_rates(hdir, args.raw_seconds, os.cpu_count())
            print_raw(raw_heavy)
            # The next version's members exist before the clock of publish-to-live starts.
            next_members = heavy_model.write_members(work / "heavy-next", seed=100)
            grown["heavy"] = served_figures("heavy", repository, heavy, reference(raw_heavy), next_members, args)
            grown["heavy"].update(raw=raw_heavy, import_v1_s=import_v1)
        if "ceiling" in only:
            grown["ceiling"] = generator_ceiling(manifest, d, args.grpc_processes)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = render(results, raw_by_engine, manifest, d, grown, args.grpc_processes)
    # Everything from the history marker on is kept: measurements of earlier states of the code.
    if args.out.exists() and HISTORY_MARKER in args.out.read_text():
        text += "\n" + args.out.read_text()[args.out.read_text().index(HISTORY_MARKER):]
    args.out.write_text(text)
    print(text)
    return 0


def print_raw(raw_by_engine: dict) -> None:
    for engine, rates in raw_by_engine.items():
        print(f"raw in-process, {engine}:", {b: f"{r:.0f} rows/s, {ms:.2f} ms" for b, (r, ms) in rates.items()},
              flush=True)


def reference(raw_by_engine: dict) -> dict[int, tuple[float, float]]:
    """The raw rates the targets are stated against: the first engine's (TensorFlow Lite when the
    version converts: what the service computes with)."""
    return next(iter(raw_by_engine.values()))


# -- the figures that grow the work -----------------------------------------------------------

def models_entry(server: Server, name: str) -> dict:
    """GET /models's entry for `name` (its live version, each version folder's state)."""
    import urllib.request

    with urllib.request.urlopen(server.url("/models"), timeout=5) as r:
        return next(m for m in orjson.loads(r.read())["models"] if m["name"] == name)


def publish_to_live(server: Server, repository: Path, name: str, sources: list[Path], classes: list[str],
                    timeout: float = 600) -> dict[str, float]:
    """Publish `sources` with `ensemble-train import` into the repository `server` polls, and time
    it: {"live_s": from starting the import until GET /models shows the new version live,
    "import_s": the import alone, "version": the new version}."""
    before = models_entry(server, name)["live"] or 0
    command = heavy_model.import_command(repository, name, sources, classes)
    with open(HERE / f".publish-{name}.log", "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        import_s = live_s = None
        while live_s is None:
            if import_s is None and proc.poll() is not None:
                import_s = time.perf_counter() - started
                if proc.returncode != 0:
                    raise RuntimeError(f"ensemble-train import exited with {proc.returncode}; see "
                                       f"benchmarks/.publish-{name}.log")
            entry = models_entry(server, name)
            if (entry["live"] or 0) > before:
                live_s = time.perf_counter() - started
            elif any(v["version"] > before and v["state"] == "failed" for v in entry["versions"]):
                raise RuntimeError(f"the server refused the published version of {name}: {entry['versions'][0]}")
            elif time.perf_counter() - started > timeout:
                raise RuntimeError(f"{name}: no new version live {timeout:.0f} s after the import started")
            else:
                time.sleep(0.05)
        if import_s is None:  # live before the import's process had exited
            proc.wait()
            import_s = time.perf_counter() - started
    return {"live_s": live_s, "import_s": import_s, "version": entry["live"]}


def served_figures(label: str, repository: Path, manifest, raw: dict[int, tuple[float, float]],
                   next_sources: list[Path], args) -> dict:
    """One ensemble on one server with --grpc-port: HTTP one-row at 1 connection and 256-row
    binary, gRPC one-row at 1 and 32 streams and 256-row raw, resident memory, publish-to-live
    of `next_sources`; then memory per member against a server of its first member alone."""
    d, processes, name, shape = args.duration, args.grpc_processes, manifest.name, manifest.input.shape
    # A 256-row figure lasts at least 40 raw batch-256 calls: a rate counted in whole requests
    # over a window of a few calls would be off by a large share of one.
    long_d = max(d, (3 if args.smoke else 40) * raw[256][1] / 1000)
    classes = list(manifest.output.classes)
    argv = [sys.executable, "-m", "service.cli", "--repository", str(repository), "--port", "{port}",
            "--grpc-port", "{grpc_port}", "--default-model", name, "--log-level", "warning"]
    one, _, _ = bodies(shape, 1)
    _, many_binary, many_header = bodies(shape, 256)
    one_rpc = grpc_load.infer_request(name, sample_rows(shape, 1))
    many_rpc = grpc_load.infer_request(name, sample_rows(shape, 256))
    out: dict = {"members": len(manifest.members), "shape": list(shape), "long_d": long_d}
    with Server(f"grpc-{label}", argv, "/readyz", "/predict", ready_timeout=900) as server:
        time.sleep(1)
        out["rss_idle_mb"] = rss_mb(server.proc.pid)
        target = f"127.0.0.1:{server.grpc_port}"
        grpc_load.check_reply(grpc_load.probe(target, one_rpc), 1)
        grpc_load.check_reply(grpc_load.probe(target, many_rpc), 256)
        url = server.url("/predict")

        def settle() -> None:
            # wrk stops with requests still queued in the server (seconds of work at 256 heavy
            # rows); the next figure starts once a one-row call behind them has been answered.
            grpc_load.probe(target, one_rpc, timeout=300)
            time.sleep(0.2)

        wrk(url, one, 4, 1 if args.smoke else 2)  # warm-up
        out["http_c1"] = wrk(url, one, 1, d)
        settle()
        out["http_bin256"] = wrk(server.url(f"/v2/models/{name}/infer"), many_binary, 4, long_d,
                                 "application/octet-stream", many_header, timeout="60s")
        settle()
        out["grpc_c1"] = grpc_load.run_load(target, one_rpc, 1, 1, d, processes)
        settle()
        out["grpc_c32"] = grpc_load.run_load(target, one_rpc, 1, 32, d, processes)
        settle()
        out["grpc256"] = grpc_load.run_load(target, many_rpc, 256, 4, long_d, processes, timeout=120)
        settle()
        out["rss_loaded_mb"] = rss_mb(server.proc.pid)
        print(label, {k: (vars(v) if isinstance(v, (Load, GrpcLoad)) else v) for k, v in out.items()}, flush=True)
        time.sleep(1)  # publish-to-live on an idle server
        out["publish"] = publish_to_live(server, repository, name, next_sources, classes)
        print(label, "publish-to-live", out["publish"], flush=True)
    # Memory per member: the same server with a version of the first member alone, both measured
    # idle after loading and warming (the load's 256-row batches grow the engine's buffers, which
    # depend on the batch, not the member count): (full - one member) / (members - 1). Dividing
    # the full server's RSS by the members would count the runtime, its libraries and the edge
    # once per member.
    if len(manifest.members) > 1:
        alone = repository.parent / f"{label}-one-member"
        heavy_model.run_import(alone, name, [repository / name / str(manifest.version) / manifest.members[0].path],
                               classes)
        with Server(f"grpc-{label}-one", [a if a != str(repository) else str(alone) for a in argv], "/readyz",
                    "/predict", ready_timeout=900) as server:
            time.sleep(1)
            out["rss_one_member_mb"] = rss_mb(server.proc.pid)
        out["rss_per_member_mb"] = (out["rss_idle_mb"] - out["rss_one_member_mb"]) / (len(manifest.members) - 1)
        print(label, "memory per member", f"{out['rss_per_member_mb']:.1f} MB", flush=True)
    return out


def generator_ceiling(manifest, duration: float, processes: int) -> dict[str, GrpcLoad]:
    """The gRPC load generator against a server that answers at once (grpc_load.ceiling), with
    the small ensemble's requests and replies of its real replies' size."""
    out = {}
    for key, rows, streams in (("c1", 1, 1), ("c32", 1, 32), ("g256", 256, 4)):
        request = grpc_load.infer_request(manifest.name, sample_rows(manifest.input.shape, rows))
        reply = grpc_load.infer_response(manifest.name, str(manifest.version), rows, len(manifest.output.classes))
        out[key] = grpc_load.ceiling(request, reply, rows, streams, duration, processes)
        print("ceiling", key, vars(out[key]), flush=True)
    return out


def render(results: dict, raw_by_engine: dict, manifest, duration: float, grown: dict | None = None,
           processes: int = 2) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    lines = [
        "# Serving benchmark",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GB, "
        f"Python {platform.python_version()}; load generator `wrk -t1` on the same machine (loopback), "
        f"{duration:.0f} s per figure. Ensemble: {manifest.name} v{manifest.version}, "
        f"{len(manifest.members)} members, input {list(manifest.input.shape)}. Command: `make bench`.",
        "",
        "Raw in-process rate of the ensemble as the service runs it (averaged and per-member outputs), "
        "by engine: TensorFlow Lite on one thread (what the service computes with, the targets' "
        "reference)" + (f", TensorFlow Lite with {wide(raw_by_engine)[0][len('tflite x'):]} threads per call "
                        "(`tflite xN`, as the server computes on this machine by default)" if wide(raw_by_engine) else "")
        + " and the frozen graph's TensorFlow function:",
        "",
        "| batch | " + " | ".join(f"{e} rows/s | {e} ms per call" for e in raw_by_engine) + " |",
        "| ---: |" + " ---: | ---: |" * len(raw_by_engine),
        *[f"| {b} | " + " | ".join(f"{rates[b][0]:,.0f} | {rates[b][1]:.2f}" for rates in raw_by_engine.values()) + " |"
          for b in next(iter(raw_by_engine.values()))],
    ]
    if results:
        lines += [
            "",
            "| server | 1 conn req/s | p50 ms | p99 ms | 32 conn req/s | p50 ms | p99 ms | 256-row JSON rows/s | 256-row binary rows/s | RSS MB | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    names = {"ours": "ensemble-serving", "ours2": "ensemble-serving --workers 2", "usual": "(a) usual way: FastAPI + model.predict",
             "bare": "(b) HTTP floor: parse + constant", "litserve": "(d) LitServe, batching 64 / 1 ms"}
    for key, r in results.items():
        c1, c32, j = r["c1"], r["c32"], r["json256"]
        binary = f"{r['bin256'].requests_per_second * 256:,.0f}" if "bin256" in r else "n/a"
        errors = sum(v.errors for v in r.values() if isinstance(v, Load))
        lines.append(f"| {names[key]} | {c1.requests_per_second:,.0f} | {c1.p50_ms:.2f} | {c1.p99_ms:.2f} | "
                     f"{c32.requests_per_second:,.0f} | {c32.p50_ms:.2f} | {c32.p99_ms:.2f} | "
                     f"{j.requests_per_second * 256:,.0f} | {binary} | {r['rss_mb']:.0f} | {errors} |")
    lines += ["", *targets(results, next(iter(raw_by_engine.values())), len(manifest.members)), ""]
    if grown:
        lines += render_grown(grown, results, processes)
    return "\n".join(lines)


def _rate(load) -> str:
    return f"{load.requests_per_second:,.0f}"


def _times(ratio: float) -> str:
    """A ratio as a factor: 2.25x, or 1/150 for a small one (0.01x would say nothing)."""
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"1/{1 / ratio:,.0f}"


def wide(raw_by_engine: dict) -> tuple[str, dict[int, tuple[float, float]]] | None:
    """(name, rates) of the raw TensorFlow Lite engine on all the cores, if measured."""
    return next(((k, v) for k, v in raw_by_engine.items() if k.startswith("tflite x")), None)


def _share(rows_per_second: float, raw_by_engine: dict) -> str:
    text = f"{rows_per_second:,.0f} ({rows_per_second / reference(raw_by_engine)[256][0]:.0%} of raw"
    if wide(raw_by_engine):
        name, rates = wide(raw_by_engine)
        text += f"; {rows_per_second / rates[256][0]:.0%} of {name}"
    return text + ")"


# The rows of the small-vs-heavy table: (figure, value of one ensemble's figures as text, the
# number the heavy / small column divides, or None where a ratio says nothing).
COMPARED = [
    ("members, input", lambda f: f"{f['members']}, {f['shape']}", None),
    ("raw engine, batch 1: ms per call", lambda f: f"{reference(f['raw'])[1][1]:.2f}", lambda f: reference(f["raw"])[1][1]),
    ("raw engine, batch 256: rows/s", lambda f: f"{reference(f['raw'])[256][0]:,.0f}", lambda f: reference(f["raw"])[256][0]),
    ("raw engine on all the cores, batch 1: ms per call",
     lambda f: f"{wide(f['raw'])[1][1][1]:.2f}" if wide(f["raw"]) else "n/a", lambda f: wide(f["raw"]) and wide(f["raw"])[1][1][1]),
    ("raw engine on all the cores, batch 256: rows/s",
     lambda f: f"{wide(f['raw'])[1][256][0]:,.0f}" if wide(f["raw"]) else "n/a", lambda f: wide(f["raw"]) and wide(f["raw"])[1][256][0]),
    ("HTTP one-row, 1 connection: p50 ms", lambda f: f"{f['http_c1'].p50_ms:.2f}", lambda f: f["http_c1"].p50_ms),
    ("... minus a raw batch-1 call: ms", lambda f: f"{f['http_c1'].p50_ms - reference(f['raw'])[1][1]:.2f}", None),
    ("HTTP 256-row binary (V2), 4 connections: rows/s",
     lambda f: _share(f["http_bin256"].requests_per_second * 256, f["raw"]),
     lambda f: f["http_bin256"].requests_per_second * 256),
    ("gRPC one-row, 1 stream: req/s", lambda f: _rate(f["grpc_c1"]), lambda f: f["grpc_c1"].requests_per_second),
    ("gRPC one-row, 1 stream: p50 ms", lambda f: f"{f['grpc_c1'].p50_ms:.2f}", lambda f: f["grpc_c1"].p50_ms),
    ("gRPC one-row, 32 streams: req/s", lambda f: _rate(f["grpc_c32"]), lambda f: f["grpc_c32"].requests_per_second),
    ("gRPC one-row, 32 streams: p99 ms", lambda f: f"{f['grpc_c32'].p99_ms:.2f}", lambda f: f["grpc_c32"].p99_ms),
    ("gRPC 256-row raw, 4 streams: rows/s", lambda f: _share(f["grpc256"].rows_per_second, f["raw"]),
     lambda f: f["grpc256"].rows_per_second),
    ("server RSS, loaded and warmed, idle: MB", lambda f: f"{f['rss_idle_mb']:.0f}", lambda f: f["rss_idle_mb"]),
    ("server RSS after the load: MB", lambda f: f"{f['rss_loaded_mb']:.0f}", lambda f: f["rss_loaded_mb"]),
    ("resident memory per member: MB", lambda f: f"{f['rss_per_member_mb']:.1f}" if "rss_per_member_mb" in f else "n/a",
     lambda f: f.get("rss_per_member_mb")),
    ("`ensemble-train import` of the next version: s", lambda f: f"{f['publish']['import_s']:.1f}",
     lambda f: f["publish"]["import_s"]),
    ("publish-to-live (import started -> GET /models live): s", lambda f: f"{f['publish']['live_s']:.1f}",
     lambda f: f["publish"]["live_s"]),
]


def render_grown(grown: dict, results: dict, processes: int) -> list[str]:
    """The figures that grow the work: gRPC, the heavy ensemble beside the small one, the load
    generator's ceiling, and issue 18's targets."""
    measured = {k: grown[k] for k in ("small", "heavy") if k in grown}
    lines = ["## gRPC, and a heavier ensemble", ""]
    if measured:
        lines += [
            "Each ensemble on one server started with `--grpc-port` (defaults otherwise), from a temporary "
            "repository. gRPC: the Open Inference Protocol's ModelInfer with the input in "
            f"`raw_input_contents`, from benchmarks/grpc_load.py ({processes} processes of grpc.aio clients, "
            "pre-serialized requests, closed loop). HTTP one-row: `POST /predict` (JSON) under wrk; 256-row "
            "binary: `POST /v2/models/{name}/infer` with the binary tensor extension. A 256-row figure lasts "
            "at least 40 raw batch-256 calls. The heavy ensemble: benchmarks/heavy_model.py, 10 Keras 3 "
            "members (Conv2D 32, 32, pool, 64, 64, pool, 128, global average pooling, Dense 10 softmax) on "
            "32x32x3 float32 inputs with random weights, published with `ensemble-train import` of `.keras` "
            "files; the small ensemble's next version is its own members' SavedModels imported again.",
            "",
            "| ensemble | gRPC figure | req/s | rows/s | p50 ms | p99 ms | errors | generator CPU, cores | seconds |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, f in measured.items():
            for key, what in (("grpc_c1", "one-row, 1 stream"), ("grpc_c32", "one-row, 32 streams"),
                              ("grpc256", "256-row raw, 4 streams")):
                g = f[key]
                lines.append(f"| {label} | {what} | {g.requests_per_second:,.0f} | {g.rows_per_second:,.0f} | "
                             f"{g.p50_ms:.2f} | {g.p99_ms:.2f} | {g.errors} | {g.client_cpu:.2f} | {g.duration:.0f} |")
        columns = list(measured)
        lines += ["", "How each figure changes from the small ensemble to the heavy one (raw: the reference "
                  "engine on one thread, as above; memory per member: (RSS of the server with the ensemble "
                  "- RSS of the same server with a version of its first member alone) / (members - 1), both "
                  "idle after loading; publish-to-live on an idle server, default 2 s polling):", "",
                  "| figure | " + " | ".join(columns) + (" | heavy / small |" if len(columns) == 2 else " |"),
                  "| --- |" + " ---: |" * (len(columns) + (len(columns) == 2))]
        for what, text, number in COMPARED:
            row = f"| {what} | " + " | ".join(text(measured[c]) for c in columns) + " |"
            if len(columns) == 2:
                a, b = (number(measured[c]) if number else None for c in columns)
                row += f" {_times(b / a)} |" if a and b is not None else " |"
            lines.append(row)
        lines.append("")
    if "ceiling" in grown:
        ceiling = grown["ceiling"]
        small = measured.get("small", {})
        lines += [
            "The gRPC load generator's own ceiling: the same generator, processes and requests (the small "
            "ensemble's) against a grpc.aio server in a process of its own that answers every call with a "
            "canned reply of the real reply's size without reading the request. It shares the machine's cores with "
            "that server, as it shares them with the service in the figures above; its CPU per call says what "
            "it takes from the server at a given rate.",
            "",
            "| requests | ceiling req/s | rows/s | p50 ms | p99 ms | generator CPU, cores | generator CPU per call, us | the service, small ensemble, req/s | service / ceiling |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, what, served in (("c1", "one-row, 1 stream", "grpc_c1"), ("c32", "one-row, 32 streams", "grpc_c32"),
                                  ("g256", "256-row raw, 4 streams", "grpc256")):
            c = ceiling[key]
            s = small.get(served)
            lines.append(f"| {what} | {c.requests_per_second:,.0f} | {c.rows_per_second:,.0f} | {c.p50_ms:.2f} | "
                         f"{c.p99_ms:.2f} | {c.client_cpu:.2f} | {c.client_cpu_us_per_request:.0f} | "
                         + (f"{s.requests_per_second:,.0f} | {s.requests_per_second / c.requests_per_second:.0%} |"
                            if s else "n/a | n/a |"))
        lines.append("")
    lines += [*grown_targets(grown, results), ""]
    return lines


def grown_targets(grown: dict, results: dict) -> list[str]:
    """Issue 18's targets, each with the measured figure and whether it is met."""
    out = ["Targets (issue 18):", ""]

    def row(what, value, goal, met):
        out.append(f"- {what}: {value} (target {goal}) - {'met' if met else 'MISSED'}")

    small, heavy = grown.get("small"), grown.get("heavy")
    if small:
        c32 = small["grpc_c32"]
        if "litserve" in results:
            ratio = c32.requests_per_second / results["litserve"]["c32"].requests_per_second
            row("gRPC one-row, 32 streams: vs LitServe's HTTP rate (32 conn)", f"{ratio:.1f}x", ">= 3x", ratio >= 3)
        else:
            out.append("- gRPC one-row, 32 streams: vs LitServe's HTTP rate: not measured (run with litserve in --only)")
        row("gRPC one-row, 32 streams: p99", f"{c32.p99_ms:.2f} ms", "< 20 ms", c32.p99_ms < 20)
    def against_raw(rows_per_second: float, raw_by_engine: dict) -> tuple[str, float]:
        # The reference is the engine as the server runs it: one call on all the cores (tflite xN)
        # when measured; the share of the one-thread engine (issue 4's reference) is said beside it.
        one_thread = rows_per_second / reference(raw_by_engine)[256][0]
        if not wide(raw_by_engine):
            return f"{one_thread:.0%}", one_thread
        name, rates = wide(raw_by_engine)
        share = rows_per_second / rates[256][0]
        return f"{share:.0%} of {name} ({one_thread:.0%} of one thread)", share

    for label, f in (("small", small), ("heavy", heavy)):
        if f:
            text, share = against_raw(f["grpc256"].rows_per_second, f["raw"])
            row(f"{label}: 256-row raw gRPC vs raw batch-256 rate", text, ">= 90%", share >= 0.9)
    if heavy:
        text, share = against_raw(heavy["http_bin256"].requests_per_second * 256, heavy["raw"])
        row("heavy: 256-row binary HTTP vs raw batch-256 rate", text, ">= 90%", share >= 0.9)
        gap = heavy["http_c1"].p50_ms - reference(heavy["raw"])[1][1]
        text = f"{gap:.2f} ms against one thread"
        if wide(heavy["raw"]):  # as above: the engine as the server runs it is the reference
            name, rates = wide(heavy["raw"])
            gap = heavy["http_c1"].p50_ms - rates[1][1]
            text = f"{gap:.2f} ms against {name} ({text})"
        row("heavy: one-row p50 at 1 connection minus a raw batch-1 call", text, "<= 1 ms", gap <= 1)
        live = heavy["publish"]["live_s"]
        row("heavy: publish-to-live, idle server", f"{live:.1f} s", "< 30 s", live < 30)
    figures = [v for f in (small, heavy) if f for v in f.values() if isinstance(v, (Load, GrpcLoad))]
    if figures:
        errors = sum(v.errors for v in figures)
        row("errors in the figures above", str(errors), "0", errors == 0)
    out.append("- HTTP figures against the code before: interleaved A/B with benchmarks/ab.py, not measured here")
    return out


def targets(results: dict, raw: dict, members: int) -> list[str]:
    """The issue's targets, each with the measured figure and whether it is met."""
    if "ours" not in results:
        return []
    ours = results["ours"]
    out = ["Targets (issue 4):", ""]

    def row(what, value, goal, met):
        out.append(f"- {what}: {value} (target {goal}) - {'met' if met else 'MISSED'}")

    c32 = ours["c32"].requests_per_second
    if "usual" in results:
        ratio = c32 / results["usual"]["c32"].requests_per_second
        row("32 conn, one row: vs the usual way", f"{ratio:.0f}x", ">= 100x", ratio >= 100)
    if "litserve" in results:
        ratio = c32 / results["litserve"]["c32"].requests_per_second
        row("32 conn, one row: vs LitServe", f"{ratio:.1f}x", ">= 4x", ratio >= 4)
    row("32 conn, one row: p99", f"{ours['c32'].p99_ms:.2f} ms", "< 15 ms", ours["c32"].p99_ms < 15)
    gap = ours["c1"].p50_ms - raw[1][1]
    row("1 conn, one row: p50 minus raw batch-1 call", f"{gap:.2f} ms", "<= 1 ms", gap <= 1)
    share = ours["bin256"].requests_per_second * 256 / raw[256][0]
    row("256-row binary vs raw batch-256 rate", f"{share:.0%}", ">= 70%", share >= 0.7)
    share = ours["json256"].requests_per_second * 256 / raw[256][0]
    row("256-row JSON vs raw batch-256 rate", f"{share:.0%}", ">= 40%", share >= 0.4)
    row(f"resident memory, {members} members loaded", f"{ours['rss_mb']:.0f} MB", "< 800 MB", ours["rss_mb"] < 800)
    errors = sum(v.errors for v in ours.values() if isinstance(v, Load))
    row("errors", str(errors), "0", errors == 0)
    if "ours2" in results:  # not the default: how the 32-connection figures scale with processes
        two = results["ours2"]
        out += ["", "With `--workers 2` (not the default; each worker holds its own ensemble):", ""]
        if "litserve" in results:
            ratio = two["c32"].requests_per_second / results["litserve"]["c32"].requests_per_second
            row("32 conn, one row: vs LitServe", f"{ratio:.1f}x", ">= 4x", ratio >= 4)
        row("32 conn, one row: p99", f"{two['c32'].p99_ms:.2f} ms", "< 15 ms", two["c32"].p99_ms < 15)
        row("resident memory (both workers)", f"{two['rss_mb']:.0f} MB", "< 800 MB", two["rss_mb"] < 800)
    return out


if __name__ == "__main__":
    sys.exit(main())
