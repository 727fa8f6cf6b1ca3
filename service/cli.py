"""`ensemble-serve`: start the HTTP service. Flags override ENSEMBLE_* variables and defaults."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from contract.store import location_of
from service.config import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ensemble-serve",
        description="Serve the newest good version of each ensemble in a model repository over HTTP. "
        "Every flag also has an environment variable (ENSEMBLE_<FLAG>, e.g. ENSEMBLE_PORT).",
    )
    p.add_argument("--repository", type=location_of, help="model repository: a folder, or an object store's "
                   "s3://BUCKET/PREFIX, gs://... or az://... (default: models)")
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: 8000)")
    p.add_argument("--grpc-port", type=int, help="port of the gRPC server (default: 0, none)")
    p.add_argument("--default-model", help="ensemble served by POST /predict (default: the only one)")
    p.add_argument("--version-policy", help="'latest' (default) or a version number to pin")
    p.add_argument("--poll-interval-seconds", type=float, help="repository polling interval (default: 2)")
    p.add_argument("--max-rows-per-request", type=int, help="rows allowed per request (default: 4096)")
    p.add_argument("--engine", choices=["tflite", "tensorflow"], help="what computes the ensemble (default: "
                   "tflite, TensorFlow Lite when the version converts and agrees, else TensorFlow)")
    p.add_argument("--inference-threads", type=int, help="batches computed at once (default: 0, one on all the worker's cores)")
    p.add_argument("--switch-interval-ms", type=float, help="Python's thread switch interval in the server (default: 1; 0: Python's 5)")
    p.add_argument("--intra-op-threads", type=int, help="threads of one batch, TensorFlow intra-op or TensorFlow Lite (default: 0, the worker's share of the cores per inference thread)")
    p.add_argument("--inter-op-threads", type=int, help="TensorFlow inter-op threads (default: 0, one per inference thread)")
    p.add_argument("--max-batch-size", type=int, help="rows merged into one ensemble call (default: 256)")
    p.add_argument("--max-batch-delay-ms", type=float, help="wait for a fuller batch (default: 0)")
    p.add_argument("--max-queue-rows", type=int, help="rows allowed to wait before 429 (default: 4096)")
    p.add_argument("--admin-token", help="bearer token enabling the admin routes (default: unset, disabled); "
                   "prefer the ENSEMBLE_ADMIN_TOKEN variable, flags show in the process list")
    p.add_argument("--state-dir", type=Path, help="where admin pins are kept across restarts (default: memory)")
    p.add_argument("--shutdown-grace-seconds", type=float, help="on SIGTERM, time for requests to finish (default: 30)")
    p.add_argument("--workers", type=int, help="server processes on the port, each with its own socket and ensemble (default: 1)")
    p.add_argument("--http-fast-path", action=argparse.BooleanOptionalAction, default=None,
                   help="serve HTTP on the fast path when uvicorn passes its check (default: on)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: info")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every flag that was given taking precedence."""
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def prepare_multiprocess_metrics() -> Path:
    """A fresh folder for prometheus_client's multiprocess files, shared by the workers."""
    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="ensemble-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # values of a previous run would be summed in
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def worker_app():
    """App factory for `--workers N`: settings from the ENSEMBLE_* environment."""
    from service.app import create_app

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for e in exc.errors():
            field = ".".join(str(p) for p in e["loc"])
            if field:
                print(f"ensemble-serve: error: {field} (--{field.replace('_', '-')} or "
                      f"ENSEMBLE_{field.upper()}): {e['msg']}", file=sys.stderr)
            else:  # a check of several settings together: its message names them
                print(f"ensemble-serve: error: {e['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from service.edge.fast_http import protocol

    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                  access_log=settings.access_log, http=protocol(settings),
                  timeout_graceful_shutdown=settings.shutdown_grace_seconds,
                  # on every response, both HTTP paths: a browser never guesses another type
                  headers=[("x-content-type-options", "nosniff")])
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **common)
        return 0
    # Several processes (service.workers: each accepts on its own socket): each worker builds
    # its app from the environment, so the settings (flags included) are handed down as
    # ENSEMBLE_* variables; metrics are aggregated across workers through prometheus_client's
    # multiprocess mode.
    if settings.state_dir is None and settings.compile_cache_dir is None:  # one compile for all workers
        settings.compile_cache_dir = Path(tempfile.mkdtemp(prefix="ensemble-compiled-"))
    for name, value in settings.model_dump(exclude_none=True).items():
        if name == "admin_token":
            value = settings.admin_token.get_secret_value()
        elif name == "store":  # handed down as the repository it came from, with the same cache
            continue
        elif name == "repository" and settings.store:
            value, os.environ["ENSEMBLE_CACHE_DIR"] = settings.store, str(settings.repository)
        os.environ[f"ENSEMBLE_{name.upper()}"] = str(value) if isinstance(value, (str, Path)) else json.dumps(value)
    prepare_multiprocess_metrics()
    from service.workers import supervise

    options = {k: v for k, v in common.items() if k not in ("host", "port")}
    return supervise(settings.workers, settings.host, settings.port, options, settings.shutdown_grace_seconds)


if __name__ == "__main__":
    sys.exit(main())
