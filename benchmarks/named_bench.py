"""Served rates of two format-2 ensembles against their engine's raw rate: a text model (raw
strings in, TextVectorization inside, a sigmoid head) and a named-features model (two numbers
and two string categories, StringLookup inside, a softmax head), three members each, built
here with Keras and published with `ensemble-train import` as a user would.

    python benchmarks/named_bench.py [--repository DIR] [--duration 8] [--rounds 2]

For each: one-row requests at 32 connections and 256-row requests at 4 connections (wrk,
TensorFlow Serving's REST predict, row format), and the engine's raw rate (the version as the
service loads it, `engine.run` called in-process on one thread at batch sizes 1, 32 and 256).
Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from bench import ROOT, Server, wrk

WORDS = ["good", "bad", "film", "plot", "actor", "very", "not", "great", "boring", "fun", "long", "short"]
CITIES = ["paris", "oslo", "lima", "rome", "kyiv"]
PLANS = ["free", "pro", "team"]


def sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))).tolist())


def build(repository: Path) -> None:
    """Three members of each model, saved as .keras and published with `ensemble-train import`."""
    import keras

    rng = np.random.default_rng(0)
    corpus = [sentence(rng) for _ in range(200)]
    work = Path(tempfile.mkdtemp(prefix="named-bench-"))
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        review = keras.Input((), dtype="string", name="review")
        vectorize = keras.layers.TextVectorization(max_tokens=2000, output_sequence_length=32)
        vectorize.adapt(corpus)
        x = keras.layers.Embedding(2000, 32)(vectorize(review))
        x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Dense(32, activation="relu")(x)
        keras.Model(review, keras.layers.Dense(1, activation="sigmoid")(x)).save(work / f"text{seed}.keras")

        age, income = keras.Input((1,), name="age"), keras.Input((1,), name="income")
        city, plan = keras.Input((1,), dtype="string", name="city"), keras.Input((1,), dtype="string", name="plan")
        parts = [keras.layers.Normalization(mean=40.0, variance=144.0)(age),
                 keras.layers.Normalization(mean=50_000.0, variance=4e8)(income),
                 keras.layers.StringLookup(vocabulary=CITIES, output_mode="one_hot")(city),
                 keras.layers.StringLookup(vocabulary=PLANS, output_mode="one_hot")(plan)]
        h = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()(parts))
        out = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(32, activation="relu")(h))
        keras.Model({"age": age, "income": income, "city": city, "plan": plan}, out).save(work / f"features{seed}.keras")
    for name, labels in (("text", "neg,pos"), ("features", "stay,upgrade,leave")):
        subprocess.run([sys.executable, "-m", "training.cli", "import", "--name", name, "--repository",
                        str(repository), "--labels", labels, *map(str, sorted(work.glob(f"{name}*.keras")))],
                       check=True, cwd=ROOT)


def rows(name: str, n: int, rng: np.random.Generator) -> list:
    if name == "text":
        return [sentence(rng) for _ in range(n)]
    return [{"age": [float(rng.integers(18, 80))], "income": [float(rng.integers(10_000, 150_000))],
             "city": [str(rng.choice(CITIES))], "plan": [str(rng.choice(PLANS))]} for _ in range(n)]


def raw_rates(version_dir: Path, seconds: float) -> dict[int, float]:
    """Rows per second of the version's engine, called in-process on one thread, by batch size."""
    sys.path.insert(0, str(ROOT))
    from contract.manifest import read_manifest
    from service.engines.base import warmup_inputs
    from service.engines.named import load_named

    manifest = read_manifest(version_dir)
    ensemble = load_named(manifest, version_dir, (1, 32, 256))
    rng = np.random.default_rng(1)
    out = {}
    for batch in (1, 32, 256):
        if manifest.name == "text":
            x = {"review": np.array([sentence(rng).encode() for _ in range(batch)], dtype=object)}
        else:
            x = warmup_inputs(manifest.inputs, batch)
        for _ in range(5):
            ensemble.engine.run(x)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            ensemble.engine.run(x)
            calls += 1
        out[batch] = batch * calls / (time.perf_counter() - started)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="a repository with `text` and `features` (built if absent)")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    repository = args.repository or Path(tempfile.mkdtemp(prefix="named-bench-repo-"))
    if not (repository / "text").is_dir():
        build(repository)
    rng = np.random.default_rng(2)
    served: dict[str, dict[str, list[float]]] = {}
    argv = [sys.executable, "-m", "service.cli", "--repository", str(repository), "--host", "127.0.0.1",
            "--port", "{port}", "--log-level", "warning"]
    with Server("ours-named", argv, "/readyz", "/predict") as server:
        for name in ("text", "features"):
            while True:  # both versions live
                ready = server.url(f"/v2/models/{name}/ready")
                import urllib.request
                try:
                    with urllib.request.urlopen(ready, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.3)
        for _ in range(args.rounds):
            for name in ("text", "features"):
                url = server.url(f"/v1/models/{name}:predict")
                figures = served.setdefault(name, {})
                one = wrk(url, orjson.dumps({"instances": rows(name, 1, rng)}), 32, args.duration)
                many = wrk(url, orjson.dumps({"instances": rows(name, 256, rng)}), 4, args.duration)
                assert one.errors == 0 and many.errors == 0, (one, many)
                figures.setdefault("c32", []).append(one.requests_per_second)
                figures.setdefault("p99", []).append(one.p99_ms)
                figures.setdefault("rows256", []).append(many.requests_per_second * 256)
    print("| model | 1 row, 32 conn req/s | p99 ms | 256 rows, 4 conn rows/s | raw engine rows/s: batch 1 | 32 | 256 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("text", "features"):
        raw = raw_rates(repository / name / "1", 3.0)
        f = served[name]
        shown = {k: " / ".join(f"{v:,.0f}" if k != "p99" else f"{v:.2f}" for v in values) +
                 (f" (**{statistics.median(values):,.0f}**)" if k != "p99" else "") for k, values in f.items()}
        print(f"| {name} | {shown['c32']} | {shown['p99']} | {shown['rows256']} | {raw[1]:,.0f} | {raw[32]:,.0f} | "
              f"{raw[256]:,.0f} |")
    print(f"\nrepository: {repository}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
