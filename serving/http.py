"""ASGI middleware of the API service: API-key check and request-body size limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.errors import error_response
from serving.ui import is_ui_path

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

# Routes open without an API key: orchestrator probes and Prometheus scrapes.
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
# Multipart framing around the uploaded file.
UPLOAD_OVERHEAD_BYTES = 64 * 1024


class ApiKeyMiddleware:
    """Bearer-token check on every route but health checks and metrics (when a key is set)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in PUBLIC_PATHS
            or is_ui_path(scope["path"])  # the playground's files; the page asks for the key
            or scope["method"] == "OPTIONS"  # CORS preflight carries no credentials
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if headers.get(b"authorization") != self.expected:
            response = error_response(
                401, "authorization", "missing or wrong API key (expected 'Bearer <key>')"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Rejects bodies whose declared length is over the upload limit before reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                field = "audio" if scope["path"].rstrip("/") == "/audio_to_audio" else "body"
                limit_mb = (self.max_bytes - UPLOAD_OVERHEAD_BYTES) / 2**20
                response = error_response(
                    413, field, f"request body over the {limit_mb:.1f} MiB upload limit"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
