"""Where do slow requests during reloads come from? Serves a copy of a repository, keeps 16
connections busy, publishes N versions one after another, and reports p50/p99 with and without
reloads and how many of the slow answers (over twice the calm p99) finished near a swap.

    .venv/bin/python benchmarks/reload_latency.py --repository models [--versions 10] [ENV=VALUE ...]

Extra ENV=VALUE arguments are passed to the server (e.g. ENSEMBLE_LOADER_DUTY_CYCLE=1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from contract.layout import scan_model  # noqa: E402
from contract.manifest import read_manifest
from tests.loadgen import Load  # noqa: E402
from tests.repo_tools import publish_copy  # noqa: E402
from tests.server import ServerProcess  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--name", default="digits")
    p.add_argument("--versions", type=int, default=10)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("env", nargs="*", help="ENV=VALUE for the server")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="reload-latency-"))
    source = max(v.version for v in scan_model(args.repository, args.name) if v.committed)
    shutil.copytree(args.repository / args.name / str(source), root / args.name / "1")
    manifest = (root / args.name / "1" / "manifest.json")
    manifest.write_text(manifest.read_text().replace(f'"version": {source}', '"version": 1'))
    spec = read_manifest(root / args.name / "1").input
    body = orjson.dumps({"instances": np.zeros((1, *spec.shape)).tolist()})
    server = ServerProcess(root, env=dict(e.split("=", 1) for e in args.env)).start()
    swaps = []
    try:
        with Load(server.port, body, args.connections) as load:
            time.sleep(3)
            t0 = time.monotonic()
            time.sleep(8)
            t1 = time.monotonic()
            for _ in range(args.versions):
                server.wait_live(publish_copy(root, args.name))
                swaps.append(time.monotonic())
            t2 = time.monotonic()
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)
    calm, reloading = load.result.between(t0, t1), load.result.between(t1, t2)
    print(f"calm: {calm.rate():.0f} req/s, p50 {calm.percentile(50) * 1e3:.1f} ms, p99 {calm.percentile(99) * 1e3:.1f} ms")
    print(f"reloading: {reloading.rate():.0f} req/s, p50 {reloading.percentile(50) * 1e3:.1f} ms, "
          f"p99 {reloading.percentile(99) * 1e3:.1f} ms, {(t2 - t1) / args.versions:.2f} s per version")
    threshold = 2 * calm.percentile(99)
    slow = [a for a in reloading.answers if a.latency > threshold]
    near = sum(1 for a in slow if min(abs(a.started + a.latency - s) for s in swaps) < 0.3)
    print(f"slow answers: {len(slow)} of {len(reloading.answers)}; within 0.3 s of a swap: {near}")
    # When the slow answers finish, counted back from the next swap: clustering at 0 points at
    # the swap and warm-up, a spread over the whole reload at the compile child.
    before = [min((s - (a.started + a.latency) for s in swaps if s >= a.started + a.latency), default=-1.0)
              for a in slow]
    edges = [0, 0.3, 1, 2, 4, 8, 16, 64]
    counts = np.histogram([b for b in before if b >= 0], bins=edges)[0]
    print("slow answers by seconds before the next swap: "
          + ", ".join(f"{lo}-{hi} s: {n}" for lo, hi, n in zip(edges, edges[1:], counts)))
    print(f"statuses: {load.result.statuses}")


if __name__ == "__main__":
    main()
