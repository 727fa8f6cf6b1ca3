"""What GET /models shows: each ensemble's version folders with their states and its policy, the
entries skipped (a bounded part of them, and their count), and whether the pins are the file's."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from service.lifecycle.pins import PinsState
from service.lifecycle.slots import ModelSlot
from service.lifecycle.snapshot import Skips
from contract.layout import VersionDir


def when(at: float) -> str:
    """A Unix time as ISO 8601 text, in UTC."""
    return datetime.fromtimestamp(at, timezone.utc).isoformat()


def version_entry(slot: ModelSlot, folder: VersionDir, detail: bool = False) -> dict:
    """One version folder: its state (live, loading, failed, uncommitted, previous, available),
    the category of its failure (with `detail`, the reason too: it may name files and carry
    exception text, so only admins see it), and for a loaded version its manifest's facts and
    engine."""
    live = slot.live.version if slot.live is not None else None
    previous = slot.previous.version if slot.previous is not None else None
    entry: dict = {"version": folder.version}
    if folder.version == live:
        entry["state"] = "live"
    elif folder.version == slot.loading:
        entry["state"] = "loading"
    elif folder.version in slot.failures:
        failure = slot.failures[folder.version]
        entry["state"] = "uncommitted" if failure.category == "uncommitted" else "failed"
        entry.update(category=failure.category,
                     failed_at=when(failure.at))
        if detail:
            entry["reason"] = failure.reason
    elif not folder.committed:
        entry["state"] = "uncommitted"
    elif folder.version == previous:
        entry["state"] = "previous"
    else:
        entry["state"] = "available"
    loaded = {live: slot.live, previous: slot.previous}.get(folder.version)
    if loaded is not None:
        m = loaded.manifest
        entry.update(created=m.created.isoformat(), members=len(m.members), metrics=m.metrics,
                     engine=loaded.engine.kind)  # what computes it: tflite or tensorflow
    return entry


def skips_status(skipped: Skips) -> dict:
    """`skipped`: the first entries skipped, with why; `skipped_count`: how many there are."""
    return {"skipped": [vars(s) for s in skipped.shown], "skipped_count": skipped.count}


def pins_status(pins: PinsState) -> dict:
    """Whether the pins in force are the pins file's (`valid`), the last good ones because the
    file is damaged (`damaged`), or unknown (`unknown`: no version served), and why."""
    return {"state": pins.state, "error": pins.error,
            "since": when(pins.since) if pins.since is not None else None}


def ensemble_status(slot: ModelSlot, folders: list[VersionDir], policy: Literal["latest"] | int,
                    pinned: bool, skipped: Skips = Skips(), detail: bool = False) -> dict:
    """One ensemble for GET /models: live and previous versions, policy, every folder newest
    first, and the entries of its folder that are not versions (with why)."""
    return {"name": slot.name,
            "live": slot.live.version if slot.live is not None else None,
            "previous": slot.previous.version if slot.previous is not None else None,
            "policy": policy, "pinned": pinned,
            "versions": [version_entry(slot, folder, detail) for folder in reversed(folders)],
            **skips_status(skipped)}
