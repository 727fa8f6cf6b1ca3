"""The service's one Settings object: every field is also an ENSEMBLE_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.layout import NAME_PATTERN
from urllib.parse import urlparse

from contract.store import is_remote

# An object store is listed once per poll: at 10 s, a replica makes 8,640 listings a day (about
# 4 US cents a day at S3's list price), where 2 s would make 43,200 for a new version seen 4 s
# sooner on average.
REMOTE_POLL_SECONDS = 10.0


class Settings(BaseSettings):
    """Configuration of ensemble-serve. Flags of the CLI override these; these override defaults."""

    model_config = SettingsConfigDict(env_prefix="ENSEMBLE_", extra="forbid")

    repository: Path = Field(Path("models"), description="model repository: a folder, or an object store's "
                             "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX (credentials and "
                             "endpoint from the cloud's environment, e.g. AWS_ENDPOINT_URL); for a store, this "
                             "becomes the local folder its versions are downloaded into (cache_dir)")
    store: str | None = Field(None, description="the object store the repository mirrors; set from repository "
                              "when that names a store")
    cache_dir: Path | None = Field(
        None, description="where the versions of an object-store repository are downloaded and checked; "
        "unset: a folder per store under the temporary folder")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    grpc_port: int = Field(0, ge=0, le=65535, description="port of the gRPC server (Open Inference Protocol, "
                           "TensorFlow Serving, health, reflection) on the same host; 0: no gRPC server")
    max_grpc_calls: int = Field(
        256, ge=1, description="gRPC calls in the server at once; more are refused RESOURCE_EXHAUSTED "
        "by gRPC before their message is read (each message is received whole, up to max_body_bytes)")
    default_model: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="ensemble served by POST /predict; unset: the only one in the repository",
    )
    version_policy: Literal["latest"] | int = Field(
        "latest", description="'latest' or a version number to pin"
    )
    poll_interval_seconds: float = Field(
        2.0, gt=0, le=3600, description="how often the repository is checked for new versions (default: 2 "
        f"for a folder, {REMOTE_POLL_SECONDS:.0f} for an object store, where each check is a paid listing)"
    )
    max_rows_per_request: int = Field(4096, ge=1, description="rows allowed in one request")
    max_batch_size: int = Field(256, ge=1, description="most rows merged into one call of the ensemble")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="how long a partial batch may wait for company (0: never)")
    max_queue_rows: int = Field(4096, ge=1, description="rows allowed to wait; beyond it: 429 (at least "
                                "max_rows_per_request, so that every request allowed can be queued)")
    request_timeout_ms: float = Field(
        0.0, ge=0, description="default deadline of a request in the queue (0: none); "
        "a request may set its own with the X-Request-Timeout-Ms header")
    workers: int = Field(1, ge=1, le=64, description="server processes on the port, each accepting on its own "
                         "socket and holding its own ensemble")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest request body; "
                                "lower still for a model whose largest valid request is smaller "
                                "(service.dataplane.limits)")
    max_inflight_bytes: int = Field(
        128 * 1024 * 1024, ge=1024, description="request bodies held at once, being received or "
        "answered, in bytes; a body that would pass it is answered 429 with Retry-After (bodies "
        "up to 64 KiB count against a separate 16 MiB, so small requests go on being answered while "
        "large ones wait)")
    max_inflight_bytes_per_peer: int = Field(
        64 * 1024 * 1024, ge=1024, description="of the request bodies held at once, the most one "
        "client address may hold (HTTP and gRPC together); past it that client's requests are "
        "answered 429 while others go on (behind a proxy that hides client addresses every client "
        "is one peer: raise it to max_inflight_bytes)")
    max_json_values: int = Field(
        1 << 22, ge=1024, description="JSON values (numbers, lists, objects, strings) one request "
        "may hold; counted on the bytes before parsing, so a body's parse never needs more than "
        "about 32 bytes of memory a value (a larger request: 413; binary Open Inference Protocol "
        "bodies are not parsed value by value)")
    warmup_batch_sizes: tuple[int, ...] = Field(
        (1, 32), description="batch sizes run through a new version before it goes live"
    )
    loader_duty_cycle: float = Field(
        0.25, gt=0, le=1, description="share of time the server's loader thread may work on a new "
        "version (importing, warming up; all of loading without isolated_loading); the rest it "
        "sleeps, leaving the cores to the requests being served (1: full speed)")
    isolated_loading: bool = Field(
        True, description="load, check and freeze each new version in a short-lived child process, "
        "so restoring SavedModels never stalls the requests being served (false: in the server's "
        "loader thread; faster to load, for tests and debugging)")
    compile_cache_dir: Path | None = Field(
        None, description="folder where compiled versions are kept, so a restart or another "
        "worker imports a version instead of compiling it again; unset: <state_dir>/compiled when "
        "state_dir is set, else nothing is kept")
    load_timeout_seconds: float = Field(
        600.0, gt=0, description="a version whose loading process takes longer is refused")
    engine: Literal["tflite", "tensorflow"] = Field(
        "tflite", description="what computes the ensemble: tflite runs each version converted to "
        "TensorFlow Lite (XNNPACK kernels; several times less CPU per row on small models) when it "
        "converts and answers what the members answer, else TensorFlow; tensorflow: always the "
        "frozen TensorFlow graph")
    inference_threads: int = Field(
        0, ge=0, le=64, description="batches computed at once, each in its own thread (0: one, "
        "on all of the worker's cores)")
    switch_interval_ms: float = Field(
        1.0, ge=0, le=100, description="Python's thread switch interval in the server "
        "(sys.setswitchinterval): the longest an inference thread waits for a busy event loop to "
        "let go of the interpreter lock, to take a batch or hand back its outputs (0: Python's "
        "default, 5 ms)")
    intra_op_threads: int = Field(
        0, ge=0, description="threads of one batch's computation, TensorFlow intra-op or TensorFlow "
        "Lite (0: the worker's share of the cores, divided among the inference threads)")
    inter_op_threads: int = Field(
        0, ge=0, description="TensorFlow inter-op threads (0: one per inference thread)")
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin routes (reload, rollback, pin); unset: they "
        "answer 403")
    state_dir: Path | None = Field(
        None, description="folder where the pins set by a rollback or a pin are kept, shared by "
        "every replica serving the repository (and the compiled versions, unless "
        "compile_cache_dir says otherwise); unset: <repository>/.state, so replicas on one "
        "repository share their pins; a server that cannot write it refuses to pin (409)")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, le=3600, description="on SIGTERM: how long requests already received may "
        "take to finish before the process exits")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024, description="largest request head (request line and "
        "headers); a larger one is answered 431 and the connection closed")
    header_timeout_seconds: float = Field(
        10.0, gt=0, le=3600, description="a request's head must arrive whole within this long of "
        "its first byte (a new connection: of its opening); else 408 and the connection is closed")
    body_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="longest pause between two reads of a request's body; "
        "past it the connection is closed")
    max_connections: int = Field(
        1024, ge=1, description="HTTP connections open at once in each worker; more are closed as "
        "they open (each may hold a request head, trailers and a read buffer: "
        "docs/operations.md has the bound)")
    min_body_rate_bytes: int = Field(
        4096, ge=0, description="after body_timeout_seconds, a request's body must have kept "
        "coming at this many bytes a second on average, or the connection is closed (Apache's "
        "mod_reqtimeout MinRate): a client trickling a body cannot hold its connection and bytes "
        "for long (0: no minimum)")
    http_fast_path: bool = Field(
        True, description="serve HTTP on service.edge.fast_http (one write per response; plain POSTs "
        "on the inference routes answered without ASGI) when the installed uvicorn passes its "
        "start-up check; false: uvicorn's own protocol")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    access_log: bool = Field(False, description="log every request (costs throughput at high rates)")

    @model_validator(mode="before")
    @classmethod
    def _object_store(cls, data):
        """A repository naming an object store: its URL kept as `store` (a Path would fold its
        '//'), and `repository` the local folder its versions are mirrored into."""
        if not isinstance(data, dict) or not is_remote(str(data.get("repository", ""))):
            return data
        given = str(data["repository"])
        url = given.rstrip("/")
        if not urlparse(given).netloc:
            raise ValueError(f"repository {given!r} names no bucket: use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
                             "or az://CONTAINER/PREFIX")
        data = {**data, "store": url}
        data["repository"] = data.get("cache_dir") or mirror_folder(url)
        data.setdefault("poll_interval_seconds", REMOTE_POLL_SECONDS)
        return data

    @model_validator(mode="after")
    def _limits_agree(self) -> "Settings":
        """Settings under which some request allowed could never be served are refused."""
        if self.max_rows_per_request > self.max_queue_rows:
            raise ValueError(
                f"max_rows_per_request ({self.max_rows_per_request}) is above max_queue_rows "
                f"({self.max_queue_rows}): a request of more rows than the queue holds could never "
                "be served; raise max_queue_rows or lower max_rows_per_request")
        if self.max_body_bytes > self.max_inflight_bytes:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) is above max_inflight_bytes "
                f"({self.max_inflight_bytes}): a body of the largest size allowed could never be "
                "admitted; raise max_inflight_bytes or lower max_body_bytes")
        if self.max_body_bytes > self.max_inflight_bytes_per_peer:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) is above max_inflight_bytes_per_peer "
                f"({self.max_inflight_bytes_per_peer}): a body of the largest size allowed could never "
                "be admitted; raise max_inflight_bytes_per_peer or lower max_body_bytes")
        return self

    @field_validator("version_policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError("a pinned version must be a positive integer, or use 'latest'")
        return value

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError("warm-up batch sizes must be positive integers, at least one")
        return sizes

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, token: object) -> object:
        return None if token == "" else token

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("the admin token must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        return token


def mirror_folder(url: str) -> Path:
    """The default local folder of an object-store repository: one per store location, in a
    folder of this user's own (mode 0700) under the temporary folder, so another local user
    cannot plant a version in it before the server downloads one."""
    import os
    import tempfile

    from contract.remote import cache_name

    base = Path(tempfile.gettempdir()) / f"ensemble-serving-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = base.lstat()
    if base.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{base} is not a private folder of this user: set cache_dir (ENSEMBLE_CACHE_DIR) to one")
    return base / cache_name(url)
