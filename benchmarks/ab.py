"""Interleaved A/B of the service: several arms (a source tree and settings each), measured in
turn, round after round, with the figures of `make bench` for `ensemble-serving`: one-row
requests at 1 and 32 connections, 256-row JSON and 256-row binary (Open Inference Protocol).

    python benchmarks/ab.py --repository models --rounds 3 \\
        --arm before=/tmp/before --arm fast=. --arm stock=.:ENSEMBLE_HTTP_FAST_PATH=false

An arm is NAME=SOURCE[:VAR=VALUE,...][?QUERY] (the query is added to /predict's URL, e.g.
`?uncertainty=true`): the server runs `python -m service.cli` from SOURCE (so
it imports that tree's `service`, e.g. a `git worktree` of an older commit), with the variables
given. The machine is shared and noisy: interleaving puts every arm in the same minutes, and
the table shows each round, so the spread is visible beside the median.

Beside the rates, the 32-connection load reports the server's CPU time per request, read from
/proc for its event loop's thread (the main thread) and for all its other threads together:
what the code costs, which the rate of a shared machine only shows through its noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import Load, Server, bodies, wrk

HERE = Path(__file__).resolve().parent


def parse_arm(text: str) -> tuple[str, Path, dict[str, str], str]:
    """NAME=SOURCE[:VAR=VALUE,...][?QUERY] -> (name, source, variables, query of /predict)."""
    text, _, query = text.partition("?")
    name, _, rest = text.partition("=")
    source, _, variables = rest.partition(":")
    env = dict(v.split("=", 1) for v in variables.split(",") if v)
    return name, Path(source).resolve(), env, query


def thread_cpu(pid: int) -> tuple[float, float]:
    """(seconds of CPU of the main thread, of all other threads) of process pid so far."""
    main = other = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        if int(task) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


FIGURES = ("c1", "c32", "json256", "bin256")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), sum(fields) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, one: bytes, many: bytes, binary: bytes, header: int, name: str, d: float,
            figures: tuple[str, ...] = FIGURES, query: str = "") -> dict:
    url = server.url("/predict" + (f"?{query}" if query else ""))
    wrk(url, one, 4, 2)  # warm-up
    r = {"c1": wrk(url, one, 1, d)} if "c1" in figures else {}
    before, machine, load = thread_cpu(server.proc.pid), machine_cpu(), os.times()
    r["c32"] = wrk(url, one, 32, d)
    after, machine_after, load_after = thread_cpu(server.proc.pid), machine_cpu(), os.times()
    requests = r["c32"].requests_per_second * round(d)
    r["cpu"] = tuple((b - a) / requests * 1e6 for a, b in zip(before, after))  # us per request
    # wrk has exited: its CPU is in this process's children's times
    r["wrk_cpu"] = ((load_after.children_user + load_after.children_system)
                    - (load.children_user + load.children_system)) / requests * 1e6
    r["machine_busy"] = (machine_after[0] - machine[0]) / (machine_after[1] - machine[1])
    if "json256" in figures:
        r["json256"] = wrk(url, many, 4, d)
    if "bin256" in figures:
        r["bin256"] = wrk(server.url(f"/v2/models/{name}/infer"), binary, 4, d, "application/octet-stream", header)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--name", default="digits")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--arm", action="append", required=True, help="NAME=SOURCE[:VAR=VALUE,...][?QUERY]")
    p.add_argument("--figures", default=",".join(FIGURES),
                   help=f"which figures, comma-separated (the 32-connection one always). Default: {','.join(FIGURES)}")
    args = p.parse_args()
    arms = [parse_arm(a) for a in args.arm]
    figures = tuple(args.figures.split(","))
    if not set(figures) <= set(FIGURES):
        p.error(f"--figures: choose among {', '.join(FIGURES)}")
    sys.path.insert(0, str(HERE.parent))
    from contract.layout import scan_model
    from contract.manifest import read_manifest

    vdir = [v for v in scan_model(args.repository, args.name) if v.committed][-1].path
    shape = read_manifest(vdir).input.shape
    one, _, _ = bodies(shape, 1)
    many, binary, header = bodies(shape, 256)
    caches = {name: tempfile.mkdtemp(prefix=f"ab-{name}-") for name, _, _, _ in arms}
    results: dict[str, list[dict]] = {name: [] for name, _, _, _ in arms}
    for round_ in range(args.rounds):
        for name, source, env, query in arms:
            argv = [sys.executable, "-m", "service.cli", "--repository", str(args.repository.resolve()),
                    "--port", "{port}", "--default-model", args.name, "--log-level", "warning"]
            server = Server(f"ab-{name}", argv, "/readyz", "/predict", cwd=source,
                            env={"PYTHONPATH": str(source), "ENSEMBLE_COMPILE_CACHE_DIR": caches[name], **env})
            with server:
                r = measure(server, one, many, binary, header, args.name, args.duration, figures, query)
            results[name].append(r)
            print(f"round {round_ + 1} {name}: " + ", ".join(
                f"{k} {v.requests_per_second:,.0f} req/s p50 {v.p50_ms:.2f} p99 {v.p99_ms:.2f}"
                for k, v in r.items() if isinstance(v, Load)) +
                ", c32 CPU us/request: loop {:.1f}, other threads {:.1f}".format(*r["cpu"]) +
                f", wrk {r['wrk_cpu']:.1f}; machine busy {r['machine_busy']:.0%}", flush=True)
    print(render(results, args.duration))
    return 0


def render(results: dict[str, list[dict]], duration: float) -> str:
    """Per arm: each round's figures, and the median of the rounds."""
    lines = [f"Interleaved A/B, {duration:.0f} s per figure, rounds in order (median in bold).", "",
             "| arm | 1 conn p50 ms | 32 conn req/s | 32 conn p99 ms | 32 conn CPU us/request: loop | "
             "other threads | 256-row JSON rows/s | 256-row binary rows/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(rounds: list[dict], key: str, get) -> str:
        if key not in rounds[0]:  # a figure not measured (--figures)
            return "-"
        values = [get(r[key]) for r in rounds]
        shown = [*values, statistics.median(values)]
        text = [f"{v:,.2f}" if v < 100 else f"{v:,.0f}" for v in shown]
        return " / ".join(text[:-1]) + f" (**{text[-1]}**)"

    for name, rounds in results.items():
        lines.append(f"| {name} | {cell(rounds, 'c1', lambda v: v.p50_ms)} | "
                     f"{cell(rounds, 'c32', lambda v: v.requests_per_second)} | "
                     f"{cell(rounds, 'c32', lambda v: v.p99_ms)} | "
                     f"{cell(rounds, 'cpu', lambda v: v[0])} | {cell(rounds, 'cpu', lambda v: v[1])} | "
                     f"{cell(rounds, 'json256', lambda v: v.requests_per_second * 256)} | "
                     f"{cell(rounds, 'bin256', lambda v: v.requests_per_second * 256)} |")
    errors = {name: sum(v.errors for r in rounds for v in r.values() if isinstance(v, Load))
              for name, rounds in results.items()}
    lines += ["", "Errors (non-2xx or socket errors): " + ", ".join(f"{k} {v}" for k, v in errors.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
