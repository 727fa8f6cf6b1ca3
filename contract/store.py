"""The repository on object storage: one small interface over obstore (S3, GCS, Azure Blob) with
the three writes the repository contract needs and the errors a reader must tell apart.

A repository given as `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix` is a
`RemoteStore`; a local path stays a folder (contract.layout) and never comes here. Credentials,
region and endpoint come from each cloud's standard environment variables and instance identity,
as obstore reads them (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL` for an S3-compatible server,
`GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`, ...); no message of this module
carries them.

The writes:
- `create`: create-only (`If-None-Match: *` on S3). Claims a version number and commits a
  manifest: of two writers, one wins and the other gets `AlreadyExists`.
- `replace`: compare-and-swap on the object's ETag (`If-Match`). Shared state (pins) changes
  only from the state the writer read; a lost race is `Conflict`.
- `write`: an unconditional whole-object write, for what no one else writes (a member's files
  under a version number this writer has claimed).

A store that accepts both conditional writes unconditionally would let two trainers publish the
same number; `missing_guarantees` finds that out with a probe before anything is published.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import obstore
from obstore import exceptions as obstore_errors

SCHEMES = ("s3", "gs", "az")
PROBE_PREFIX = ".probe"
# A connection that takes longer than CONNECT_TIMEOUT is a store that is down: readers report it
# and try again at the next poll instead of hanging on it. REQUEST_TIMEOUT bounds a whole request,
# body included: a member file that takes longer to download fails, and is tried again next poll.
CONNECT_TIMEOUT = "5s"
REQUEST_TIMEOUT = "300s"
RETRIES = 2
RETRY_TIMEOUT = timedelta(seconds=15)


class StoreError(Exception):
    """The store could not be used; the message says why in one line, without credentials.
    `meaning` is the kind of failure alone (no location, no server text), for public routes."""

    def __init__(self, message: str, meaning: str = "the store failed"):
        super().__init__(message)
        self.meaning = meaning


class AlreadyExists(StoreError):
    """A create-only write found the object there: another writer created it first."""


class Conflict(StoreError):
    """A compare-and-swap write found the object changed since it was read."""


class NotFound(StoreError):
    """No object at that key."""


@dataclass(frozen=True)
class Entry:
    """One object of a listing: its key (relative to the store's prefix), size, ETag and when it
    was last written (seconds since the epoch)."""

    key: str
    size: int
    etag: str | None
    modified: float | None = None


def is_remote(location: str | Path) -> bool:
    """Whether a repository location names an object store (else it is a local folder)."""
    return isinstance(location, str) and urlparse(location).scheme in SCHEMES


def location_of(text: str) -> str | Path:
    """A repository location as given on a command line: an object store's URL kept as written
    (a Path would fold its '//'), anything else a folder."""
    return text if is_remote(text) else Path(text)


def _endpoint_options(url: str) -> dict:
    """Plain HTTP only where the user named an http:// endpoint for an S3-compatible server."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options = {"connect_timeout": CONNECT_TIMEOUT, "timeout": REQUEST_TIMEOUT}
    if urlparse(url).scheme == "s3" and endpoint.startswith("http://"):
        options["allow_http"] = True
    return options


_STATUS = re.compile(r"status code: (\d{3})")
_STATUS_MEANING = {
    "400": "the store refused the request (400): check the region and the endpoint",
    "401": "the credentials were not accepted (401)",
    "403": "access denied (403): check the credentials and their rights on the bucket",
    "404": "the bucket or container does not exist (404)",
}


def _reason(exc: Exception) -> tuple[str, str]:
    """What went wrong, from an obstore error: (the kind of failure, one line: that kind and the
    error's first line; its debug trace names internals)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    status = _STATUS.search(text)
    if isinstance(exc, obstore_errors.PermissionDeniedError):
        meaning = _STATUS_MEANING["403"]
    elif isinstance(exc, obstore_errors.UnauthenticatedError):
        meaning = _STATUS_MEANING["401"]
    elif status is not None:
        meaning = _STATUS_MEANING.get(status.group(1), f"the store answered {status.group(1)}")
    elif "error sending request" in text or "timed out" in text.lower():
        meaning = "the store did not answer (down, or a wrong endpoint)"
    else:
        return "the store failed", text[:300]
    return meaning, f"{meaning}; {text[:240]}"


class RemoteStore:
    """A bucket (and prefix) of an object store; keys are relative to the prefix, with '/'."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        if parsed.scheme not in SCHEMES or not parsed.netloc:
            raise StoreError(f"{url!r} is not an object-store location: use s3://BUCKET/PREFIX, "
                             "gs://BUCKET/PREFIX or az://CONTAINER/PREFIX")
        self.url = url.rstrip("/")
        try:
            self._store = obstore.store.from_url(
                self.url, client_options=_endpoint_options(url),
                retry_config={"max_retries": RETRIES, "retry_timeout": RETRY_TIMEOUT})
        except Exception as exc:  # obstore raises its configuration errors as several types
            meaning, line = _reason(exc)
            raise StoreError(f"cannot use {self.url}: {line}", meaning) from None

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    @contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        """obstore's errors (and a local file's) as this module's, saying what and where."""
        try:
            yield
        except obstore_errors.AlreadyExistsError:
            raise AlreadyExists(f"{self.url}/{key} already exists") from None
        except obstore_errors.PreconditionError:
            raise Conflict(f"{self.url}/{key} changed since it was read") from None
        except (obstore_errors.NotFoundError, FileNotFoundError):  # obstore raises the latter for a missing key
            raise NotFound(f"{self.url}/{key} does not exist") from None
        except obstore_errors.BaseError as exc:
            meaning, line = _reason(exc)
            raise StoreError(f"cannot {what} {self.url}/{key}: {line}", meaning) from None
        except OSError as exc:  # a local file of a download or an upload
            raise StoreError(f"cannot {what} {self.url}/{key}: {exc}", "a local file failed") from None

    def list(self, prefix: str = "") -> list[Entry]:
        """Every object under `prefix` (one listing, paged by the client)."""
        with self._errors("list", prefix):
            return [Entry(item["path"], int(item["size"]), item.get("e_tag"),
                          item["last_modified"].timestamp() if item.get("last_modified") else None)
                    for page in obstore.list(self._store, prefix or None) for item in page]

    def read(self, key: str) -> tuple[bytes, str | None]:
        """The object's bytes and its ETag."""
        with self._errors("read", key):
            result = obstore.get(self._store, key)
            return bytes(result.bytes()), result.meta.get("e_tag")

    def download(self, key: str, path: Path) -> None:
        """The object written to the local file `path`, streamed."""
        with self._errors("read", key), open(path, "wb") as out:
            for chunk in obstore.get(self._store, key):
                out.write(chunk)

    def _put(self, what: str, key: str, data: bytes | Path, **mode) -> str | None:
        with self._errors(what, key):
            return obstore.put(self._store, key, data, **mode)["e_tag"]

    def write(self, key: str, data: bytes | Path) -> str | None:
        """Write the object whatever is there; its new ETag."""
        return self._put("write", key, data)

    def create(self, key: str, data: bytes | Path) -> str | None:
        """Write the object only if there is none (AlreadyExists otherwise); its ETag."""
        return self._put("create", key, data, mode="create")

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Write the object only if its ETag is still `etag` (Conflict otherwise); its new ETag."""
        return self._put("replace", key, data, mode={"e_tag": etag})

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            obstore.delete(self._store, key)

    def missing_guarantees(self) -> list[str]:
        """The conditional writes this store ignores, found with a probe object (removed after):
        empty when a create-only write refuses an existing object and a compare-and-swap
        refuses a stale ETag. StoreError if the store cannot be written at all."""
        key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
        missing = []
        first = self.create(key, b"first")
        try:
            try:
                self.create(key, b"second")
                missing.append("create-only writes (If-None-Match: *): a second create of one key succeeded, "
                               "so two trainers could publish the same version number")
            except AlreadyExists:
                pass
            current = self.read(key)[1]
            stale = first if first != current else '"0000000000000000"'
            try:
                self.replace(key, b"third", stale)
                missing.append("compare-and-swap writes (If-Match): a write with a stale ETag succeeded, "
                               "so two admins could overwrite each other's pins")
            except Conflict:
                pass
        finally:
            try:
                self.delete(key)
            except StoreError:
                pass
        return missing
