"""One JSON error shape for every 4xx/5xx answer of the API service, and ``ApiError``.

``{"error": "<field>: <message>", "detail": [{"loc": [<field>], "msg": ..., "type": ...}]}``,
the same shape as BentoML's own validation errors, so clients parse one format.
Endpoints raise ``ApiError``; ``serving.http.install`` renders it, in one place.
"""

from __future__ import annotations

import math
import re
from http import HTTPStatus
from typing import Any, cast

from starlette.responses import JSONResponse

_FIELD_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


def error_response(
    status: int, field: str | None, message: str, headers: dict[str, str] | None = None
) -> Any:
    """JSON error naming the offending field (``None`` for errors about no one field).

    A nested field is dotted (``start.prompt``); its ``loc`` lists the parts, as in
    validation errors. Typed ``Any``: endpoints declared to answer a file or model
    return it as well.
    """
    loc: list[str] = field.split(".") if field else []
    body = {
        "error": f"{field}: {message}" if field else message,
        "detail": [{"loc": loc, "msg": message, "type": HTTPStatus(status).phrase}],
    }
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(Exception):
    """An error answer: HTTP ``status``, the request ``field`` at fault (dotted, or None),
    the message, and for a 503 when to retry. Raised by endpoints and their helpers."""

    def __init__(
        self,
        status: int,
        field: str | None,
        message: str,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field
        self.message = message
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = None
        if self.retry_after_s is not None:
            headers = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return cast(JSONResponse, error_response(self.status, self.field, self.message, headers))


def _is_shaped(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("detail"), list)
        and all(
            isinstance(item, dict)
            and set(item) == {"loc", "msg", "type"}
            and isinstance(item.get("loc"), list)
            and isinstance(item.get("msg"), str)
            and isinstance(item.get("type"), str)
            for item in body["detail"]
        )
    )


def _location(loc: Any) -> list[str | int]:
    if not isinstance(loc, list | tuple):
        return []
    return [part if isinstance(part, int) else str(part) for part in loc]


def shape_error_body(status: int, body: Any) -> dict[str, Any] | None:
    """``body`` (an error another layer wrote, e.g. BentoML) in this module's shape.

    Validation errors keep their field locations, and ``error`` names the fields
    (``start.prompt: String should have at least 1 character``) rather than an
    internal model name. ``None`` when ``body`` is in the shape already.
    """
    if _is_shaped(body):
        return None
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if isinstance(body, list) and len(body) == 1:  # BentoML answers BadInput as [{"error": ...}]
        body = body[0]
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        items = [
            {
                # Invalid JSON has no location inside the body: the body is the field.
                "loc": _location(item.get("loc")) or ["body"],
                "msg": str(item.get("msg", phrase)).removeprefix("Value error, "),
                "type": str(item.get("type", phrase)),
            }
            for item in detail
        ]
        error = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in items[:5]
        )
        return {"error": error, "detail": items}
    if isinstance(body, dict):
        message = body.get("error") or body.get("detail") or phrase
    else:
        message = body if isinstance(body, str) and body else phrase
    message = str(message)[:500]
    # BentoML's BadInput messages from serving.http read "<field>: <message>".
    field, separator, rest = message.partition(": ")
    if separator and _FIELD_RE.match(field):
        return {"error": message, "detail": [{"loc": [field], "msg": rest, "type": phrase}]}
    return {"error": message, "detail": [{"loc": [], "msg": message, "type": phrase}]}
