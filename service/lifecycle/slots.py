"""The state the manager keeps per ensemble name: live and previous versions, failures."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.engines.base import Ensemble


@dataclass
class Failure:
    """Why a version is not served, and the stamp of its files when it failed."""

    reason: str
    stamp: tuple
    at: float
    category: str = "invalid"


@dataclass
class ModelSlot:
    """The state of one ensemble name: live and previous versions, and versions that failed."""

    name: str
    live: Ensemble | None = None
    previous: Ensemble | None = None
    failures: dict[int, Failure] = field(default_factory=dict)
    loading: int | None = None
