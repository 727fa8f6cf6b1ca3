"""The parts of a running service that its transports and routes share, typed and handed to
each of them by the app factory: settings, metrics, the manager (the versions), the batcher and
the bytes in flight. Nothing is looked up on the web framework's state."""

from __future__ import annotations

from dataclasses import dataclass

from service.batching import Batcher
from service.config import Settings
from service.dataplane.limits import InflightBytes
from service.lifecycle.manager import ModelManager
from service.metrics import ServiceMetrics


@dataclass(frozen=True, eq=False)
class Runtime:
    """What one server process runs on. `http_path` is the HTTP path in use ("fast" or "asgi")."""

    settings: Settings
    metrics: ServiceMetrics
    manager: ModelManager
    batcher: Batcher
    inflight: InflightBytes
    http_path: str = "asgi"
