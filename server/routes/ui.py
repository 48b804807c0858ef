"""The web page: ``GET /`` (index.html) and ``GET /static/{filename}`` (its script and style sheet).

Plain HTML/CSS/JS in server/static/ (shipped as package data; no build step, nothing from another
origin). The page uses the JSON API only: POST /caption, GET /checkpoints, GET /checkpoints/{name}/guard
and GET /evaluations. It inserts every string the server sends with textContent, never as markup, since
captions are model output; the Content-Security-Policy below backs that up (scripts, styles and requests
from this origin only, no inline script), so a caption that did reach markup still could not run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from capguard.server.errors import ApiError

router = APIRouter(tags=["ui"], include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache",   # revalidate: a new release's page shows without a hard reload
           "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP}


def static_file(filename: str) -> FileResponse:
    """A file directly in STATIC_DIR with a known suffix; 404 for anything else (no subfolders, no dot files).

    Example: "app.js" -> server/static/app.js as text/javascript; "../app.py" or ".env" -> ApiError 404.
    """
    path = STATIC_DIR / filename
    media_type = MEDIA_TYPES.get(path.suffix)
    hidden_or_nested = filename.startswith(".") or "/" in filename or "\\" in filename
    if hidden_or_nested or media_type is None or not path.is_file():
        raise ApiError(404, "not_found", f"no static file {filename!r}")
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/")
def index() -> FileResponse:
    """The page."""
    return static_file("index.html")


@router.get("/static/{filename}")
def static(filename: str) -> FileResponse:
    """app.js, style.css and whatever else lies in server/static/."""
    return static_file(filename)
