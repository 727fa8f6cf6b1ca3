"""The data plane: what every protocol and transport asks of the service, and nothing of how it
was asked. A request's ensemble by name and version, its rows computed in some batch by a
deadline and returned as a typed `Answer` (service.answer), the limits a request to a loaded
version must keep, and refusals counted. HTTP (service.edge) and gRPC (service.rpc) are thin
transports over this and the protocol codecs (service.protocols); neither imports the other.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from contract.manifest import InputSpec
from service.answer import Answer
from service.batching import rows_of
from service.dataplane.limits import Hold, decoded_bytes, json_value_limit
from service.engines.base import Ensemble
from service.errors import BytesInFlight, DeadlineExceeded, ModelNotFound, PayloadTooLarge, QueueFull, ServiceError
from service.runtime import Runtime

_REJECT_REASONS = {QueueFull: "queue_full", DeadlineExceeded: "deadline", PayloadTooLarge: "too_large",
                   BytesInFlight: "bytes_in_flight"}
MAX_VERSION_DIGITS = 18  # a version number longer than this is loaded nowhere


class DataPlane:
    """Ensembles, inference and limits for every protocol, on a process's `Runtime`."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings, self.metrics, self.inflight = runtime.settings, runtime.metrics, runtime.inflight
        self.manager, self.batcher = runtime.manager, runtime.batcher
        self._value_limits: dict[tuple[int, ...], int] = {}

    def ensemble(self, name: str | None, version: str | None) -> Ensemble:
        """The named ensemble's live version, or the loaded `version`; the default with no name."""
        manager = self.manager
        if name is None:
            return manager.get(manager.default_name())
        if version is not None and len(version) > MAX_VERSION_DIGITS:
            raise ModelNotFound(f"version {version[:20]}... of {name!r} is not loaded")
        return manager.get(name, int(version) if version else None)

    def check_admission(self) -> None:
        """Refuse at once (429, 503) when nothing more can be queued: before a body is parsed."""
        self.batcher.check_admission()

    async def infer(self, ensemble: Ensemble, x: np.ndarray | dict[str, np.ndarray], deadline: float | None,
                    hold: Hold | None = None) -> Answer:
        """The ensemble's answer for the rows x (one array, or a format-2 version's named
        arrays), computed in some batch; the request leaves the queue by `deadline` (monotonic
        time; None: no deadline) or is refused (504). `hold`, the bytes in flight its body holds,
        grows first by what its decoded strings hold (429 past the budget), and is released by
        the transport with the body's."""
        if hold is not None:
            extra = decoded_bytes(x)
            if extra:
                total = hold.small + hold.large + extra
                if not self.inflight.grow(hold, total):
                    raise BytesInFlight(self.inflight.refusal(hold, total))
        outputs = await self.batcher.submit(ensemble, x, deadline)
        self.metrics.observe_rows(ensemble.name, rows_of(x))
        return ensemble.answer(outputs)

    def largest_request(self, size_of: Callable[[InputSpec, int], int], none_loaded: int) -> int:
        """The largest `size_of(input spec, max rows)` of the versions loaded (live or previous),
        and never more than max_body_bytes; `none_loaded` while none is. A format-2 version
        (strings and variable lengths have no largest) counts as max_body_bytes."""
        rows, cap = self.settings.max_rows_per_request, self.settings.max_body_bytes
        loaded = [e for slot in self.manager.slots.values() for e in (slot.live, slot.previous) if e is not None]
        sizes = [size_of(e.input_spec, rows) if e.manifest.format_version == 1 else cap for e in loaded]
        return min(max(sizes, default=none_loaded), cap)

    def json_value_limit(self, ensemble: Ensemble) -> int:
        """The most JSON values a valid request to `ensemble` holds (service.dataplane.limits)."""
        if ensemble.manifest.format_version != 1:  # strings and variable lengths: the cap alone
            return self.settings.max_json_values
        shape = ensemble.input_spec.shape
        limit = self._value_limits.get(shape)
        if limit is None:
            limit = self._value_limits[shape] = json_value_limit(
                ensemble.input_spec, self.settings.max_rows_per_request, self.settings.max_json_values)
        return limit

    def count_refusal(self, exc: ServiceError) -> None:
        """A request refused before inference: counted by reason when it is one of REJECT_REASONS."""
        reason = _REJECT_REASONS.get(type(exc))
        if reason:
            self.metrics.rejected.labels(reason).inc()
