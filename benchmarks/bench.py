"""The serving benchmark: this service against the usual way, the HTTP floor, the raw in-process
rate and LitServe, on the same 5-member ensemble, loaded by wrk on loopback.

    python benchmarks/bench.py --repository models --name digits [--duration 10]

Writes the table to benchmarks/RESULTS.md (and prints it).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
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

HERE = Path(__file__).resolve().parent
HISTORY_MARKER = "<!-- history: kept by bench.py -->"
ROOT = HERE.parent


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
        header_length: int | None = None) -> Load:
    """Run wrk against url with one body; parse rate, p50, p99 and errors."""
    with tempfile.NamedTemporaryFile(suffix=".body", delete=False) as f:
        f.write(body)
    env = {**os.environ, "BODY_FILE": f.name, "CONTENT_TYPE": content_type,
           "HEADER_LENGTH": "" if header_length is None else str(header_length)}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s", "--timeout", "5s", "--latency",
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
                 cwd: Path = ROOT):
        self.name, self.port, self.cwd = name, free_port(), cwd
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
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

        deadline = time.monotonic() + 180
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
        raise RuntimeError(f"{self.name} did not become ready in 180 s")

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


def raw_rates(version_dir: Path, seconds: float = 3.0) -> dict[str, dict[int, tuple[float, float]]]:
    """The ensemble as the service runs it, called in-process on one thread, by engine:
    {"tflite": {batch: (rows per second, ms per call)}, "tensorflow": {...}}. "tflite" is what
    the service computes with (absent if this version does not convert); "tensorflow" is the
    frozen graph's function (TensorFlow's default thread pools)."""
    from service.engines.compile import compile_version
    from service.engines.lite import load_lite
    from service.engines.tensorflow import import_frozen
    from service.repository import read_manifest

    manifest = read_manifest(version_dir)
    compiled = compile_version(manifest, version_dir)
    ensemble = import_frozen(manifest, version_dir, compiled.frozen, (1, 32, 256))
    engines = {"tensorflow": ensemble.engine.run}
    if compiled.lite is not None:
        ensemble = load_lite(manifest, version_dir, compiled.lite, (1, 32, 256))
        engines = {"tflite": ensemble.engine.run, **engines}
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for engine, run in engines.items():
        out[engine] = {}
        for batch in (1, 32, 256):
            x = rng.uniform(0, 16, (batch, *ensemble.input_spec.shape)).astype("float32")
            for _ in range(20):
                run(x)
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                run(x)
                calls += 1
            per_call = (time.perf_counter() - started) / calls
            out[engine][batch] = (batch / per_call, per_call * 1000)
    return out


def bodies(shape: tuple[int, ...], rows: int) -> tuple[bytes, bytes, int]:
    """(JSON body, V2 binary body, its JSON header length) for `rows` digits-like rows."""
    x = np.random.default_rng(1).integers(0, 17, (rows, *shape)).astype("float32")
    json_body = orjson.dumps({"instances": x.astype(int).tolist()})
    head = orjson.dumps({"inputs": [{"name": "instances", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]})
    return json_body, head + x.astype("<f4").tobytes(), len(head)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--name", default="digits")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    p.add_argument("--only", default="ours,ours2,usual,bare,litserve", help="servers to run, comma-separated")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args()

    from service.repository import read_manifest, scan_model

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
    only = set(args.only.split(","))
    print(f"ensemble {manifest.name} v{manifest.version}: {len(manifest.members)} members", flush=True)

    raw_by_engine = raw_rates(vdir)
    for engine, rates in raw_by_engine.items():
        print(f"raw in-process, {engine}:", {b: f"{r:.0f} rows/s, {ms:.2f} ms" for b, (r, ms) in rates.items()},
              flush=True)

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
            wrk(url, one, 4, 2)  # warm-up
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

    text = render(results, raw_by_engine, manifest, d)
    # Everything from the history marker on is kept: measurements of earlier states of the code.
    if args.out.exists() and HISTORY_MARKER in args.out.read_text():
        text += "\n" + args.out.read_text()[args.out.read_text().index(HISTORY_MARKER):]
    args.out.write_text(text)
    print(text)
    return 0


def render(results: dict, raw_by_engine: dict, manifest, duration: float) -> str:
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
        "reference) and the frozen graph's TensorFlow function:",
        "",
        "| batch | " + " | ".join(f"{e} rows/s | {e} ms per call" for e in raw_by_engine) + " |",
        "| ---: |" + " ---: | ---: |" * len(raw_by_engine),
        *[f"| {b} | " + " | ".join(f"{rates[b][0]:,.0f} | {rates[b][1]:.2f}" for rates in raw_by_engine.values()) + " |"
          for b in next(iter(raw_by_engine.values()))],
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
    lines += ["", *targets(results, next(iter(raw_by_engine.values()))), ""]
    return "\n".join(lines)


def targets(results: dict, raw: dict) -> list[str]:
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
    row("resident memory, 5 members loaded", f"{ours['rss_mb']:.0f} MB", "< 800 MB", ours["rss_mb"] < 800)
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
