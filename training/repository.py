"""Where the trainer reads and publishes: a local folder repository, or an object store
(`s3://`, `gs://`, `az://`; contract.store) that it reads through a local mirror.

On a store, the trainer needs the newest committed version of the ensemble it trains (the
champion its gate compares with, the version its manifest says it replaces): `open_repository`
downloads that one into a mirror folder, checked, and the pipelines read the mirror as they read
any folder. Publishing goes to the store (contract.remote: claim, upload, manifest last), and
only to a store that honours conditional writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from contract.store import RemoteStore, StoreError, is_remote


class RepositoryError(Exception):
    """The repository cannot be used for publishing; the message says why in one line."""


@dataclass(frozen=True)
class Repository:
    """A repository as the trainer uses it: `local`, a folder to read versions from (the
    repository itself, or the mirror of a store), and `store`, the store's location if any."""

    local: Path
    store: str | None = None

    def destination(self) -> Path | RemoteStore:
        """Where a version is published: the folder, or the store."""
        return RemoteStore(self.store) if self.store else self.local

    def where(self, name: str, version: int | None = None) -> str:
        """The location of an ensemble (or one of its versions) as a user would write it."""
        base = f"{self.store}/{name}" if self.store else str(self.local / name)
        return base if version is None else f"{base}/{version}"


def mirror_folder(url: str, work_dir: Path | None) -> Path:
    """The local folder that mirrors the store at `url`: under the work folder when one is
    given, else under the user's cache folder, one per store location."""
    from contract.remote import cache_name

    base = work_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ensemble-serving"
    return base / "mirror" / cache_name(url)


def open_repository(location: str | Path, name: str, work_dir: Path | None = None,
                    read_latest: bool = True) -> Repository:
    """The repository at `location` (a folder, or a store's URL) for publishing. For a store:
    refused if it ignores conditional writes, and (with `read_latest`) the newest committed
    version of `name` downloaded into the mirror folder. RepositoryError saying why, in one line."""
    if not is_remote(location):
        return Repository(Path(location))
    from contract.remote import Mirror

    try:
        store = RemoteStore(str(location))
        missing = store.missing_guarantees()
        if missing:
            raise RepositoryError(f"{store.url} cannot be published to: it ignores " + "; and ".join(missing))
        local = mirror_folder(store.url, work_dir)
        if not read_latest:
            return Repository(local, store.url)
        result = Mirror(store, local, name=name, latest_only=True).sync()
    except StoreError as exc:
        raise RepositoryError(str(exc)) from None
    if result.refused:
        version, why = next(iter(result.refused.items()))
        raise RepositoryError(f"the newest version {version} in {store.url} could not be read: {why}")
    return Repository(local, store.url)
