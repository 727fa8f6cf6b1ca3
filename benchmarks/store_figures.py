"""The object-store repository's figures, against a real SeaweedFS on loopback: a poll's cost
with N versions on the store, a replica's cold start from the store against one from a folder,
and publish-to-live.

    .venv/bin/python benchmarks/store_figures.py --repository models --versions 100 [--rounds 2]

`--repository` is a folder repository whose newest digits version is copied onto the store
N times. Each cold start has an empty cache and an empty compile cache (the compile child runs).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from contract.layout import MANIFEST_FILE, scan_model  # noqa: E402
from contract.remote import Mirror  # noqa: E402
from contract.store import RemoteStore  # noqa: E402
from service.lifecycle.pins import PinStore  # noqa: E402
from tests.repo_tools import manifest_as, upload_copy  # noqa: E402
from tests.s3server import S3Server  # noqa: E402
from tests.server import ServerProcess  # noqa: E402


class Counting(RemoteStore):
    """A RemoteStore that counts the calls made through it (one call: one request, except a
    listing, which the client pages at 1,000 keys)."""

    calls: dict[str, int]

    def list(self, prefix=""):
        entries = super().list(prefix)
        self.calls["list requests"] = self.calls.get("list requests", 0) + max(1, math.ceil(len(entries) / 1000))
        return entries

    def read(self, key):
        self.calls["get"] = self.calls.get("get", 0) + 1
        return super().read(key)

    def download(self, key, path):
        self.calls["get"] = self.calls.get("get", 0) + 1
        return super().download(key, path)


def cold_start(location: str, env: dict[str, str], work: Path) -> float:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    server = ServerProcess(location, env={**env, "ENSEMBLE_CACHE_DIR": str(work / "cache"),
                                          "ENSEMBLE_COMPILE_CACHE_DIR": str(work / "compiled")})
    try:
        server.start(timeout=600)
        return time.monotonic() - started
    finally:
        server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--versions", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    source = max(v.version for v in scan_model(args.repository, "digits") if v.committed)
    source_dir = args.repository / "digits" / str(source)
    tmp = Path(tempfile.mkdtemp(prefix="store-figures-"))
    with S3Server(tmp / "s3") as s3:
        os.environ.update(s3.env())
        store = Counting(s3.url("figures"))
        store.calls = {}
        started = time.monotonic()
        for version in range(1, args.versions + 1):
            upload_copy(store, source_dir, "digits", version)
        objects = len(store.list())
        print(f"uploaded {args.versions} versions ({objects} objects) in {time.monotonic() - started:.1f} s")

        mirror, pins = Mirror(store, tmp / "cache", per_sync=2), PinStore(remote=store)
        while mirror.sync().downloaded:  # everything in, as a replica after its first polls
            pass
        store.calls = {}
        times = []
        for _ in range(10):
            t = time.perf_counter()
            pins.refresh()
            mirror.sync()
            times.append(time.perf_counter() - t)
        per_poll = {k: v / 10 for k, v in store.calls.items()}
        print(f"a poll with nothing new, {args.versions} versions: {per_poll} requests, "
              f"{statistics.median(times) * 1000:.0f} ms (median of 10)")

        folder = tmp / "folder"
        shutil.copytree(source_dir, folder / "digits" / "1")
        (folder / "digits" / "1" / MANIFEST_FILE).write_text(manifest_as(source_dir, 1))
        env = {**s3.env(), "ENSEMBLE_POLL_INTERVAL_SECONDS": "10"}
        for r in range(args.rounds):  # interleaved: the store, then the folder
            on_store = cold_start(store.url, env, tmp / "cold")
            on_folder = cold_start(str(folder), env, tmp / "cold")
            print(f"round {r + 1}: cold start to ready from the store {on_store:.1f} s, from a folder {on_folder:.1f} s")

        for poll in ("10", "1"):
            work = tmp / f"live-{poll}"
            server = ServerProcess(store.url, env={**env, "ENSEMBLE_POLL_INTERVAL_SECONDS": poll,
                                                   "ENSEMBLE_CACHE_DIR": str(work / "cache"),
                                                   "ENSEMBLE_COMPILE_CACHE_DIR": str(work / "compiled")})
            try:
                server.start(timeout=600)
                waits = []
                for _ in range(args.rounds):
                    version = max(server.models()["live"], args.versions) + 1
                    while True:
                        try:
                            upload_copy(store, source_dir, "digits", version)
                            break
                        except Exception:  # noqa: BLE001 - a number taken: the next
                            version += 1
                    committed = time.monotonic()
                    server.wait_live(version, timeout=600)
                    waits.append(time.monotonic() - committed)
                print(f"poll {poll} s: manifest committed to live {', '.join(f'{w:.1f}' for w in waits)} s")
            finally:
                server.kill()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
