"""`ensemble-admin`: pin, roll back and unpin an ensemble for every replica, without HTTP.

It writes the pins file the servers read at each poll (service.lifecycle.pins), in the
repository's shared state (`<repository>/.state`, or the state folder every replica is given),
so every replica serving the repository follows within a poll interval plus a load:

    ensemble-admin --repository models rollback digits     # the version before the one serving
    ensemble-admin --repository models pin digits 3
    ensemble-admin --repository models unpin digits        # back to the newest good version
    ensemble-admin --repository models status

On an object store (`--repository s3://...`) the pins are the store's `.state/pins.json` object,
changed by compare-and-swap, which every replica reading the store follows.

A version of a folder is checked (manifest and every file's checksum) before it is pinned; one
on a store is checked by each replica as it downloads it. Without a
running server the CLI cannot know which versions a server refused; `rollback` pins the newest
committed version below the one the pins or the policy choose. A damaged pins file is reported
(`status` exits 1) and never written over: the pins it held would be lost for every replica.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.lifecycle.pins import PinsNotShared, PinStore, pins_folder
from contract.integrity import ChecksumError, verify_checksums
from contract.store import RemoteStore, StoreError, is_remote, location_of
from contract.layout import scan_model_entries, scan_names
from contract.manifest import ManifestError, read_manifest

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ensemble-admin", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=location_of, default=location_of(os.environ.get("ENSEMBLE_REPOSITORY", "models")),
                   help="model repository folder (default: ENSEMBLE_REPOSITORY, else models)")
    p.add_argument("--state-dir", type=Path, default=os.environ.get("ENSEMBLE_STATE_DIR") or None,
                   help="the replicas' shared state folder, if they are given one (default: "
                   "ENSEMBLE_STATE_DIR, else <repository>/.state)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="pins and committed versions of every ensemble")
    pin = sub.add_parser("pin", help="serve VERSION of NAME on every replica, whatever is published later")
    pin.add_argument("name")
    pin.add_argument("version", type=int)
    for command, text in (("rollback", "pin NAME to the version before the one serving"),
                          ("unpin", "let NAME follow the policy again (the newest good version)")):
        sub.add_parser(command, help=text).add_argument("name")
    return p


def committed_versions(repository: Path, name: str) -> list[int]:
    return [v.version for v in scan_model_entries(repository, name)[0] if v.committed]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if is_remote(args.repository):
        try:
            repo = StoreRepository(args.repository)
        except StoreError as exc:
            return refuse(str(exc))
        store = PinStore(pins_folder(Path("."), args.state_dir)) if args.state_dir else PinStore(remote=repo.remote)
    else:
        repo = FolderRepository(args.repository)
        store = PinStore(pins_folder(args.repository, args.state_dir))
    store.refresh()
    if args.command == "status":
        damaged = store.state.state != "valid"
        for name in repo.names:
            pinned = store.get(name)
            pins = "pins unknown (the pins file is damaged)" if damaged else (
                f"pinned to {pinned}" if pinned else "following the policy")
            print(f"{name}: {pins}; committed versions {repo.committed(name) or 'none'}")
        if damaged:
            return refuse(f"the pins file {store.path} is damaged ({store.state.error}): every replica "
                          "keeps the pins it read before, and one started since serves nothing; repair "
                          "it or remove it (no pins)")
        return EXIT_OK
    if args.name not in repo.names:
        return refuse(f"no ensemble named {args.name!r} in {args.repository}")
    versions = repo.committed(args.name)
    if args.command == "unpin":
        return record(store, args.name, None, f"{args.name} unpinned: every replica follows its policy again")
    if args.command == "rollback":
        serving = store.get(args.name) or max(versions, default=0)
        earlier = [v for v in versions if v < serving]
        if not earlier:
            return refuse(f"{args.name} has no committed version before {serving} to roll back to")
        version = earlier[-1]
    else:
        version = args.version
        if version not in versions:
            return refuse(f"{args.name} has no committed version {version} (committed: {versions or 'none'})")
    problem = repo.check(args.name, version)
    if problem:
        return refuse(f"{args.name} version {version} fails its checks, not pinned: {problem}")
    return record(store, args.name, version, f"{args.name} pinned to version {version} on every replica "
                  "(within a poll interval, plus loading it where it is not loaded)")


class FolderRepository:
    """A folder repository as the CLI reads it: names, committed versions, a version's checks."""

    def __init__(self, root: Path):
        self.root = root
        self.names = scan_names(root)

    def committed(self, name: str) -> list[int]:
        return committed_versions(self.root, name)

    def check(self, name: str, version: int) -> str | None:
        folder = self.root / name / str(version)
        try:
            verify_checksums(folder, read_manifest(folder))
        except (ManifestError, ChecksumError) as exc:
            return str(exc)
        return None


class StoreRepository:
    """An object-store repository as the CLI reads it, from one listing. A version's files are
    checked by each replica as it downloads it (contract.remote.Mirror), not here: a pinned
    version that fails there is refused by the replicas, which keep serving what they had."""

    def __init__(self, url: str):
        from contract.remote import versions_of

        self.remote = RemoteStore(url)
        listing = versions_of(self.remote.list())
        self._committed = {name: sorted(n for n, v in found.items() if v.committed) for name, found in listing.items()}
        self.names = sorted(n for n, v in self._committed.items() if v)

    def committed(self, name: str) -> list[int]:
        return self._committed.get(name, [])

    def check(self, name: str, version: int) -> str | None:
        return None


def record(store: PinStore, name: str, version: int | None, done: str) -> int:
    try:
        store.set(name, version)
    except PinsNotShared as exc:
        return refuse(str(exc))
    print(done)
    return EXIT_OK


def refuse(reason: str) -> int:
    print(f"ensemble-admin: {reason}", file=sys.stderr)
    return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
