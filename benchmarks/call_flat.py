"""Whether the TensorFlow engine's private entry point still earns its place: a version's frozen
graph called through `ConcreteFunction._call_flat` (what service/engines/tensorflow.py uses)
against the public call of the same function, interleaved, on one thread.

    python benchmarks/call_flat.py --repository models --name digits
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--name", default="digits")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    import tensorflow as tf

    from service.engines.compile import compile_version
    from service.engines.tensorflow import configure_threads, import_frozen
    from contract.layout import scan_model
    from contract.manifest import read_manifest

    configure_threads(1, 1)
    folder = [v for v in scan_model(args.repository, args.name) if v.committed][-1].path
    manifest = read_manifest(folder)
    engine = import_frozen(manifest, folder, compile_version(manifest, folder).frozen, (1, 32)).engine
    if not hasattr(engine.fn, "_call_flat"):
        print("this TensorFlow has no _call_flat: the engine already calls the public API")
        return 1
    ways = {"_call_flat": lambda x: engine.fn._call_flat([tf.constant(x)], engine.fn.captured_inputs),
            "public call": lambda x: engine.fn(tf.constant(x))}
    print("| batch | " + " | ".join(f"{w} us per call (rounds; median)" for w in ways) + " |")
    print("| ---: |" + " ---: |" * len(ways))
    for rows, calls in ((1, 2000), (32, 300)):
        x = np.random.default_rng(0).random((rows, *manifest.input.shape)).astype(manifest.input.dtype)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(args.rounds):
            for way, call in ways.items():
                started = time.perf_counter()
                for _ in range(calls):
                    call(x)
                times[way].append((time.perf_counter() - started) / calls * 1e6)
        print(f"| {rows} | " + " | ".join(
            " / ".join(f"{t:.0f}" for t in ts) + f" (**{statistics.median(ts):.0f}**)" for ts in times.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
