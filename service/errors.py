"""The service's own exceptions, each with the HTTP status it maps to (in one place: api.py)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, the message is what the client is told."""

    status: int = 500


class MalformedRequest(ServiceError):
    """The body is not parseable (not JSON, not the expected container)."""

    status = 400


class InvalidInput(ServiceError):
    """The body parses but its content is wrong: missing field, shape, type, non-finite value."""

    status = 422


class ModelNotFound(ServiceError):
    """No ensemble (or version) of that name is known."""

    status = 404


class PayloadTooLarge(ServiceError):
    """The body or the number of rows exceeds a configured limit."""

    status = 413


class NotReady(ServiceError):
    """No verified version is live for the requested ensemble."""

    status = 503


class InferenceFailed(ServiceError):
    """The ensemble raised or returned something that is not one probability row per input."""

    status = 500


class QueueFull(ServiceError):
    """The batch queue is at its bound: come back shortly."""

    status = 429


class BytesInFlight(QueueFull):
    """The request bodies being received or answered hold as many bytes as allowed: come back
    shortly."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could be computed."""

    status = 504


class Conflict(ServiceError):
    """The request cannot be carried out in the current state (e.g. nothing to roll back to)."""

    status = 409


class Unauthorized(ServiceError):
    """An admin route was called without the right bearer token."""

    status = 401


class Forbidden(ServiceError):
    """An admin route was called while admin routes are disabled (no token configured)."""

    status = 403
