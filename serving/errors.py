"""One JSON error shape for every 4xx/5xx answer of the API service.

``{"error": "<field>: <message>", "detail": [{"loc": [<field>], "msg": ..., "type": ...}]}``,
the same shape as BentoML's own validation errors, so clients parse one format.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse


class ModelOverloaded(Exception):
    """The model service refused or timed out a clip: answer 503 instead of waiting."""


def error_response(
    status: int, field: str | None, message: str, headers: dict[str, str] | None = None
) -> Any:
    """JSON error naming the offending field (``None`` for errors about no one field).

    Typed ``Any``: endpoints declared to answer a file or model return it as well.
    """
    loc = [field] if field else []
    body = {
        "error": f"{field}: {message}" if field else message,
        "detail": [{"loc": loc, "msg": message, "type": HTTPStatus(status).phrase}],
    }
    return JSONResponse(body, status_code=status, headers=headers)


def failed(ctx: Any, response: JSONResponse) -> Any:
    """Return an error from an API that takes ``ctx``: BentoML applies ctx's status code."""
    ctx.response.status_code = response.status_code
    return response
