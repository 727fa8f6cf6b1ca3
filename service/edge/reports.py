"""The trainer's report where people look, and the API's own documentation without a network.

    GET /models/{name}/versions/{v}/report           the version's report.json
    GET /models/{name}/versions/{v}/report/{file}    its pictures (reliability.png, ...)
    GET /ui                                          one page: every ensemble and version, its
                                                     state, metrics against the member chosen on
                                                     validation, pictures, live request rates
    GET /docs                                        Swagger UI, its assets served from the
                                                     installed swagger-ui-bundle package

The report is read from the version's folder in the repository (any committed version, loaded or
not; no symbolic link on the way: not the ensemble's folder, the version's or the file), and its
data source is shown as a file name only: public routes do not tell where files live. The
handlers are plain functions, so FastAPI runs their file reads in its thread pool, off the
event loop. The page is one HTML file (`ui.html`) with its script and
style inline and no external assets, so it works on a cluster without internet.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path, PurePath

import orjson
from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from service.errors import ModelNotFound
from contract.files import read_nofollow
from contract.layout import MANIFEST_FILE, is_valid_name

REPORT_FILE = "report.json"
PICTURE = re.compile(r"[a-z0-9_]{1,64}\.png")
MAX_FILE_BYTES = 32 * 1024 * 1024  # a report or picture larger than this is not the trainer's
_HERE = Path(__file__).resolve().parent


def version_folder(repository: Path, name: str, version: int) -> Path:
    """The folder of a committed version of `name` in the repository, or 404."""
    if not is_valid_name(name):
        raise ModelNotFound(f"no ensemble named {name[:64]!r}")
    ensemble = repository / name
    folder = ensemble / str(version)
    if ensemble.is_symlink() or folder.is_symlink() or not (folder / MANIFEST_FILE).is_file():
        raise ModelNotFound(f"{name} has no published version {version}")
    return folder


def read_file(path: Path) -> bytes:
    """A regular file's bytes (no symbolic link, at most MAX_FILE_BYTES), or 404."""
    try:
        return read_nofollow(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ModelNotFound(f"{path.parent.name} has no {path.name}") from None
    except OSError:  # a link, not a regular file, too large, unreadable
        raise ModelNotFound(f"{path.parent.name} has no {path.name} that is a report file") from None


def public_report(raw: bytes) -> bytes:
    """The report as served: the data source by its file name only; 404 if it is not a JSON
    object (not a report the trainer wrote)."""
    try:
        report = orjson.loads(raw)
    except orjson.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        raise ModelNotFound("this version's report.json is not a report (not a JSON object)")
    data = report.get("data")
    if isinstance(data, dict) and isinstance(data.get("source"), str):
        data["source"] = PurePath(data["source"]).name or data["source"]
    return orjson.dumps(report)


_CACHE = {"cache-control": "public, max-age=60"}


@lru_cache(maxsize=1)
def _page() -> tuple[bytes, str]:
    """ui.html and its Content-Security-Policy: its own inline script and style (by their
    digests) and nothing else, so no injected markup can run or load anything."""
    page = (_HERE / "ui.html").read_bytes()

    def digests(tag: bytes) -> str:
        blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {digests(b'script')}; style-src {digests(b'style')}; "
              "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy


async def ui() -> Response:
    """The one-page view of the ensembles (ui.html), under its Content-Security-Policy."""
    page, policy = _page()
    return Response(page, media_type="text/html; charset=utf-8", headers={"content-security-policy": policy})


def swagger_assets() -> Path | None:
    """The folder of Swagger UI's files in the installed swagger-ui-bundle package, or None."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    folder = Path(swagger_ui_path)
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def register(app: FastAPI, repository: Path) -> None:
    """Add the report routes (of the versions in `repository`), /ui and, when the app was made
    without FastAPI's own (CDN) docs page, /docs on local assets."""

    def report(name: str, version: int = PathParam(ge=1)) -> Response:
        """The version's report.json (what the trainer measured and decided)."""
        raw = read_file(version_folder(repository, name, version) / REPORT_FILE)
        return Response(public_report(raw), media_type="application/json", headers=_CACHE)

    def picture(name: str, file: str, version: int = PathParam(ge=1)) -> Response:
        """One of the report's pictures, by file name (lower-case letters, digits, `_`, `.png`)."""
        if not PICTURE.fullmatch(file):
            raise ModelNotFound(f"no report picture named {file[:64]!r}")
        return Response(read_file(version_folder(repository, name, version) / file), media_type="image/png",
                        headers=_CACHE)

    app.add_api_route("/models/{name}/versions/{version}/report", report, methods=["GET"])
    app.add_api_route("/models/{name}/versions/{version}/report/{file}", picture, methods=["GET"])
    app.add_api_route("/ui", ui, methods=["GET"], include_in_schema=False)
    assets = swagger_assets()
    if app.docs_url is None and assets is not None:
        app.mount("/docs/assets", StaticFiles(directory=assets), name="swagger-assets")

        async def docs() -> Response:
            return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                       swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs/assets/swagger-ui.css",
                                       swagger_favicon_url="/docs/assets/favicon-32x32.png")

        app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
