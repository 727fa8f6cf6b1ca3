"""The routes FastAPI answers: liveness, readiness, repository state, metrics, and the admin
routes (reload, rollback, pin) behind the bearer token."""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from service.edge.replies import Reply, as_response, json_reply
from service.errors import Forbidden, Unauthorized
from service.lifecycle.manager import ModelManager
from service.metrics import CONTENT_TYPE
from service.runtime import Runtime


def register(app: FastAPI, runtime: Runtime) -> None:
    """Add these routes to the app, on the process's runtime."""
    manager, settings, metrics = runtime.manager, runtime.settings, runtime.metrics

    # -- liveness, readiness, state, metrics -----------------------------------------------------

    async def healthz() -> Response:
        return as_response(json_reply({"status": "alive"}))

    async def readyz() -> Response:
        ready, reason = manager.readiness()
        return as_response(json_reply({"ready": ready, "reason": reason}, 200 if ready else 503))

    async def models() -> Response:
        """Every ensemble and version folder with its state as the last poll saw them (no request
        walks the file system); `skipped`, the repository's entries that are not ensembles;
        `pins`, whether the pins in force are the pins file's; `http` names the HTTP path that
        serves (`fast`: service.edge.fast_http; `stock`: uvicorn's own)."""
        return as_response(json_reply({**manager.status(), "http": runtime.http_path}))

    async def prometheus_metrics() -> Response:
        return as_response(Reply(200, metrics.exposition(), CONTENT_TYPE.encode()))

    # -- admin: reload, rollback, pin --------------------------------------------------------------

    def admin(request: Request) -> ModelManager:
        """Bearer-token check of the admin routes; disabled (403) when no token is configured."""
        token = settings.admin_token
        if token is None:
            raise Forbidden("admin routes are disabled: set ENSEMBLE_ADMIN_TOKEN to enable them")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.get_secret_value().encode()):
            raise Unauthorized("admin routes need the header 'Authorization: Bearer <ENSEMBLE_ADMIN_TOKEN>'")
        return manager

    async def detailed_status(name: str, manager: ModelManager = Depends(admin)) -> Response:
        """GET /models's entry for `name`, with why each refused version was refused (the reasons
        name files and carry exception text, so they are not public)."""
        return as_response(json_reply(manager.named_status(name, detail=True)))

    async def reload(name: str, manager: ModelManager = Depends(admin)) -> Response:
        """Check the repository for `name` now instead of at the next poll."""
        return as_response(json_reply(await manager.reload(name)))

    async def rollback(name: str, manager: ModelManager = Depends(admin)) -> Response:
        """Serve the previous version again at once, pinned until DELETE /models/{name}/pin."""
        return as_response(json_reply(await manager.rollback(name)))

    async def pin(name: str, version: int = PathParam(ge=1), manager: ModelManager = Depends(admin)) -> Response:
        """Serve `version` (loading and checking it first), whatever is published later."""
        return as_response(json_reply(await manager.pin(name, version)))

    async def unpin(name: str, manager: ModelManager = Depends(admin)) -> Response:
        """Follow the configured policy again (normally: the newest good version)."""
        return as_response(json_reply(await manager.unpin(name)))

    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/models", models, methods=["GET"])
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"])
    app.add_api_route("/models/{name}/status", detailed_status, methods=["GET"])
    app.add_api_route("/models/{name}/reload", reload, methods=["POST"])
    app.add_api_route("/models/{name}/rollback", rollback, methods=["POST"])
    app.add_api_route("/models/{name}/pin/{version}", pin, methods=["POST"])
    app.add_api_route("/models/{name}/pin", unpin, methods=["DELETE"])
