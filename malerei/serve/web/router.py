"""Serves the web page: ``/`` is the single HTML page, ``/web/...`` its CSS, ES modules and icon.

Plain files, no build step. The page talks to the native API only (same origin, session cookie);
its extra routes (first-run admin, registration, sign-up policy; installed upscalers and
restorers) are included here so the app mounts the whole page with one ``include_router``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from malerei.serve.api.routes import web_accounts, web_catalog
from malerei.serve.errors import not_found

STATIC = Path(__file__).resolve().parent / "static"

TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".png": "image/png"}

# Everything the page loads comes from this origin; no inline script or style.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}

router = APIRouter()
router.include_router(web_accounts.router)
router.include_router(web_catalog.router)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=TYPES[".html"], headers=HEADERS)


@router.api_route("/web/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
def asset(path: str) -> FileResponse:
    """A file of ``static/`` by its relative path; anything else (``..``, other types) is 404."""
    file = (STATIC / path).resolve()
    if not file.is_relative_to(STATIC) or not file.is_file() or file.suffix not in TYPES:
        raise not_found("file")
    return FileResponse(file, media_type=TYPES[file.suffix], headers=HEADERS)
