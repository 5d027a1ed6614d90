"""The pages the worker serves: the dashboard (``GET /``, files in ``web/``), the API's
contract (``GET /openapi.json``) and its reference rendered by Swagger UI (``GET /docs``),
whose files come from the ``swagger-ui-py`` package. Nothing is fetched from elsewhere:
deployments may be offline. The pages hold no data; what they show comes from the API,
with the caller's key."""

from __future__ import annotations

import functools
import mimetypes
from importlib import resources
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmworker.errors import NotFound

WEB = Path(str(resources.files("llmworker") / "web"))
# Scripts and styles from this origin only; the API is called from here too.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# The page's own scripts and styles change with a release at the same URLs: browsers
# check them again each time. Swagger UI's files change only with its package.
PAGE_ASSET_CACHE = "no-cache"
SWAGGER_CACHE = "public, max-age=86400"
# What /static serves: the pages themselves only at their own paths, with their CSP.
ASSET_SUFFIXES = (".js", ".css", ".png", ".svg", ".ico")
# Of Swagger UI's folder, only what /docs loads.
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-16x16.png", "favicon-32x32.png")


@functools.cache
def _swagger_dir() -> Path:
    spec = resources.files("swagger_ui") / "static"
    return Path(str(spec))


@functools.cache
def _files(
    folder: Path, names: tuple[str, ...] = (), suffixes: tuple[str, ...] = ()
) -> dict[str, Path]:
    """The files a folder serves, by name (those named, or those ending so): only these,
    so no request path can reach anything else."""
    if not folder.is_dir():
        return {}
    return {
        p.name: p
        for p in folder.iterdir()
        if p.is_file() and (p.name in names or (suffixes and p.name.endswith(suffixes)))
    }


def _file(
    folder: Path,
    name: str,
    *,
    page: bool = False,
    assets: dict[str, Path] | None = None,
    cache: str = PAGE_ASSET_CACHE,
) -> Response:
    path = (assets if assets is not None else _files(folder, (name,))).get(name)
    if path is None:
        raise NotFound(f"No file {name[:80]!r} here.")
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media.startswith("text/") or media == "application/javascript":
        media += "; charset=utf-8"
    headers = {"X-Content-Type-Options": "nosniff"}
    if page:
        headers |= {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
    else:
        headers["Cache-Control"] = cache
    return Response(path.read_bytes(), media_type=media, headers=headers)


async def dashboard(request: Request) -> Response:
    return _file(WEB, "dashboard.html", page=True)


async def static(request: Request) -> Response:
    return _file(WEB, request.path_params["name"], assets=_files(WEB, suffixes=ASSET_SUFFIXES))


async def docs(request: Request) -> Response:
    return _file(WEB, "docs.html", page=True)


async def docs_asset(request: Request) -> Response:
    folder = _swagger_dir()
    assets = _files(folder, SWAGGER_FILES)
    return _file(folder, request.path_params["name"], assets=assets, cache=SWAGGER_CACHE)


async def openapi_json(request: Request) -> Response:
    state = request.app.state
    body: bytes | None = getattr(state, "openapi", None)
    if body is None:
        from llmworker.openapi import document

        body = state.openapi = orjson.dumps(document(state.worker.settings))
    return Response(body, media_type="application/json")


def routes() -> list[Route]:
    return [
        Route("/", dashboard, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/docs/assets/{name}", docs_asset, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
