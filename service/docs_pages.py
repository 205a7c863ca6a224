"""/docs (Swagger UI), /redoc and /openapi.json, served with assets shipped in a package, never from a CDN.

FastAPI's default pages load their JavaScript and CSS from a CDN, so on an offline cluster /docs is a blank
page. The assets come from the `fastapi-offline` package's static folder (a pinned copy of Swagger UI and ReDoc)
and are served by one route with a fixed list of names, which also gives the metrics a route label.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from service.errors import NuwaError

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
_MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def read_swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon.png",
    )


@router.get("/redoc")
async def read_redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url="/docs-assets/redoc.standalone.js",
        redoc_favicon_url="/docs-assets/favicon.png",
        with_google_fonts=False,
    )


@router.get("/openapi.json")
async def read_openapi(request: Request) -> JSONResponse:
    app: FastAPI = request.app
    return JSONResponse(app.openapi())


@router.get("/docs-assets/{name}")
async def read_docs_asset(name: str) -> FileResponse:
    media_type = _MEDIA_TYPES.get(name)
    if media_type is None:
        error = NuwaError(f"no documentation asset named {name!r}", code="not_found")
        error.status_code = 404
        raise error
    return FileResponse(ASSETS / name, media_type=media_type, headers={"Cache-Control": "max-age=86400"})


__all__ = ["ASSETS", "router"]
