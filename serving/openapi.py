"""Completes BentoML's OpenAPI document with what the service really answers.

BentoML documents each API's request and 200 answer; this adds the error answers
every route can give (one shape, :mod:`serving.errors`), the probes' 503, and the
plain Starlette routes ``GET /seed_images`` and ``GET /model_info``.
"""

from __future__ import annotations

import copy
from typing import Any

from riffusion.api_schemas import ModelInfo, SeedImageList

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
ERROR_SCHEMAS: dict[str, Any] = {
    "ErrorDetail": {
        "type": "object",
        "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "description": "Path to the offending field (empty when no one field is at fault).",
            },
            "msg": {"type": "string"},
            "type": {"type": "string"},
        },
    },
    "ErrorBody": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {
                "type": "string",
                "description": "One line naming the field(s) at fault: '<field>: <message>'.",
            },
            "detail": {"type": "array", "items": {"$ref": "#/components/schemas/ErrorDetail"}},
        },
    },
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
# Answers any API route may give besides its own 200.
API_ERRORS: dict[int, str] = {
    400: "Invalid input; `error` and `detail[].loc` name the field.",
    401: "Missing or wrong API key (only when the service has one).",
    413: "Request body over the upload limit.",
    415: "Unsupported Content-Type for this route.",
    429: "Too many requests in flight; retry after `Retry-After` seconds.",
    503: "Model service loading, restarting or unavailable; retry after `Retry-After` seconds.",
    504: "Not answered within the service's request timeout.",
}
GET_ERRORS = (400, 401, 429, 503, 504)
PROBE_PATHS = ("/healthz", "/livez", "/readyz")


def _error(status: int, description: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status in (429, 503):
        answer["headers"] = RETRY_AFTER
    return answer


def _model_schema(model: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """A pydantic model's JSON schema with its definitions moved into the components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        spec["components"]["schemas"].setdefault(name, definition)
    return dict(schema)


def _mark_nullable(node: Any) -> None:
    """``nullable`` on every property defaulting to null (BentoML drops ``X | None``)."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict):
            for prop in properties.values():
                if isinstance(prop, dict) and "default" in prop and prop["default"] is None:
                    prop["nullable"] = True
                    if "enum" in prop and None not in prop["enum"]:  # OpenAPI 3.0.3: null listed
                        prop["enum"] = [*prop["enum"], None]
        for value in node.values():
            _mark_nullable(value)
    elif isinstance(node, list):
        for value in node:
            _mark_nullable(value)


def document_api(bentoml_spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(bentoml_spec)
    _mark_nullable(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(ERROR_SCHEMAS)
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            # BentoML's keys mix ints and strings; its 400/404/500 shapes are not ours.
            responses = {
                str(code): answer
                for code, answer in operation.get("responses", {}).items()
                if str(code) not in ("400", "404", "500")
            }
            operation["responses"] = responses
            if path in PROBE_PATHS:
                responses["503"] = _error(503, "Not ready / not alive (see README, probes).")
            elif path != "/metrics":
                for status, description in API_ERRORS.items():
                    if method == "get" and status not in GET_ERRORS:
                        continue
                    responses[str(status)] = _error(status, description)
    for path in PROBE_PATHS:
        if path in spec["paths"]:
            spec["paths"][path]["get"]["responses"]["200"] = {
                "description": "Ready / alive.",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"type": "string", "enum": ["ok"]}},
                        }
                    }
                },
            }
    get_errors = {str(s): _error(s, API_ERRORS[s]) for s in GET_ERRORS}
    spec["paths"].setdefault("/seed_images", {})["get"] = {
        "summary": "List seed and mask images",
        "description": "Seed and mask images (id, kind, tempo, description).",
        "tags": ["Service APIs"],
        "parameters": [
            {
                "name": "kind",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["seed", "mask"]},
            }
        ],
        "responses": {
            "200": {
                "description": "The listing.",
                "content": {"application/json": {"schema": _model_schema(SeedImageList, spec)}},
            },
            **get_errors,
        },
    }
    spec["paths"]["/model_info"] = {
        "get": {
            "summary": "The loaded model",
            "description": "The checkpoint, device, dtype, UNet backend and start-up warm-up.",
            "tags": ["Service APIs"],
            "responses": {
                "200": {
                    "description": "The model service's description.",
                    "content": {"application/json": {"schema": _model_schema(ModelInfo, spec)}},
                },
                **get_errors,
            },
        }
    }
    return spec
