"""The playground page at ``/ui``: static HTML/JS/CSS served by the API service.

No build step and no CDN: every asset lives in ``serving/playground/`` and is
served from here, so the page works on offline deployments. The page calls the
public endpoints itself (with the API key the user types in when a call answers
401), so its own files are public: they hold nothing secret.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

UI_PATH = "/ui"
ASSETS_DIR = Path(__file__).resolve().parent / "playground"


def is_ui_path(path: str) -> bool:
    """True for the playground's own files, which need no API key."""
    return path == UI_PATH or path.startswith(UI_PATH + "/")


async def _to_index(request: Request) -> RedirectResponse:
    # Relative, so the page's relative asset and API URLs also work behind a path prefix.
    return RedirectResponse("ui/", status_code=307)


def ui_routes() -> list[BaseRoute]:
    """``/ui`` redirecting to ``/ui/``, which serves index.html and the page's assets."""
    return [
        Route(UI_PATH, _to_index, methods=["GET", "HEAD"]),
        Mount(UI_PATH, app=StaticFiles(directory=ASSETS_DIR, html=True), name="ui"),
    ]
