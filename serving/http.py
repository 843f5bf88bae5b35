"""The services' HTTP layers around BentoML's own middleware; all installed here.

``install(service, ...)`` gives the API service two layers. The outer one goes
before BentoML's (metrics, tracing, timeout, concurrency limit, CORS), so that
every answer it or BentoML gives is shaped the same way and cheap requests never
reach the model:

1. CORS headers on every answer, errors included (preflights answered here);
2. error shaping: BentoML's own error bodies (validation 400, 429, 504, 500) are
   rewritten to :mod:`serving.errors`' shape; 429 and 503 carry ``Retry-After``;
3. probes: ``/readyz`` and ``/livez`` answered from a cached model-service check
   (see :class:`ModelProbe`), never waiting on the model;
4. unknown paths -> 404 before BentoML's metrics see them (one series per path);
5. API key (constant-time compare, case-insensitive ``Bearer``);
6. content types: JSON routes take ``application/json``, uploads
   ``multipart/form-data``; anything else is 415;
7. the body limit, counted as the bytes arrive (chunked bodies included).

The inner one sits inside BentoML's, next to the endpoints, where cancelling a
handler reaches the endpoint and its model calls:

8. the request's lifetime (:mod:`serving.request_lifetime`): its deadline, and its
   cancellation when the client leaves;
9. the shutdown drain (:mod:`serving.shutdown`): requests still running when the
   grace ends are answered 503.

``install_model_service`` gives the model service the inner layer only (its caller
is the API service).

It also closes BentoML input paths a public server must not have: a file field
sent as text is never fetched as a URL, a malformed multipart body is a 400, and
an upload's client-chosen file name never reaches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serving.connection_limits import bound_connections
from serving.errors import ApiError, error_response, shape_error_body
from serving.metrics import ForgetDeadOnScrape
from serving.request_lifetime import RequestLifetime
from serving.shutdown import DrainOnShutdown, ShutdownDrain
from serving.ui import is_ui_path

if TYPE_CHECKING:
    from starlette.routing import BaseRoute
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("riffusion.http")

# Routes open without an API key: orchestrator probes and Prometheus scrapes.
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
PROBE_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
PROBE_METHODS = frozenset({"GET", "HEAD"})
# Multipart framing around the uploaded file.
UPLOAD_OVERHEAD_BYTES = 64 * 1024
# Seconds a client should wait after a 429 (a slot frees within one clip) or a 503.
RETRY_AFTER_S = {429: 1, 503: 5}
# BentoML's own routes besides the API's (the index page, docs); its static assets are
# known by their files (see ``static_paths``).
BENTOML_PATHS = frozenset({"/", "/docs.json", "/schema.json", "/metrics"})
# The one CORS configuration: this module's outer layer answers preflights and covers
# what it answers itself (401, 404, 413, 415, probes); BentoML's own layer, given the
# same settings (``bentoml_http_config``), is what the Bento records.
CORS_METHODS = ["GET", "POST", "OPTIONS"]
CORS_EXPOSE_HEADERS = ["X-Riffusion-Pipeline-Seconds", "Retry-After"]
# Error bodies BentoML writes are small; anything larger is passed through untouched.
_MAX_SHAPED_BODY = 256 * 1024


class BodyTooLarge(Exception):
    """Raised into the application when a request body passes the limit mid-stream."""


# ------------------------------------------------------------------------- probes
@dataclass
class ModelProbe:
    """Readiness and liveness of the model service, answered without waiting on it.

    ``check`` asks the model service (its own ``/readyz``); it runs in the
    background, at most once per ``refresh_s``, and a probe waits for it at most
    ``wait_s`` before answering from the last known state. A check still unanswered
    after ``unresponsive_s`` means not ready: a killed model worker's socket stays
    open in the supervisor, so the check hangs rather than fails. Liveness fails
    only once the model service, after having been ready, has been unreachable or
    not ready for more than ``grace_s`` counted from the first check that found it
    so (not from the last poll: probes may be minutes apart); a restart that takes
    longer needs a new pod.
    """

    check: Callable[[], Awaitable[bool]]
    grace_s: float = 90.0
    refresh_s: float = 1.0
    wait_s: float = 0.05
    unresponsive_s: float = 1.5
    check_timeout_s: float = 5.0
    ever_ready: bool = False
    failing_since: float | None = None  # the first failed check since the last good one
    checked_at: float = float("-inf")
    _ready: bool = False
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _task_started_at: float = 0.0

    async def _refresh(self) -> None:
        try:
            ready = bool(await asyncio.wait_for(self.check(), self.check_timeout_s))
        except Exception as exc:  # unreachable, restarting, timed out: all "not ready"
            logger.debug("model service readiness check failed: %r", exc)
            ready = False
        self._record(ready, time.monotonic())

    def _record(self, ready: bool, now: float) -> None:
        self._ready, self.checked_at = ready, now
        if ready:
            self.ever_ready, self.failing_since = True, None
        elif self.failing_since is None:
            self.failing_since = now

    async def poll(self) -> None:
        """Start a background check when the last one is stale; wait for it briefly."""
        if self._task is None or self._task.done():
            if time.monotonic() - self.checked_at < self.refresh_s:
                return
            self._task = asyncio.ensure_future(self._refresh())
            self._task_started_at = time.monotonic()
        await asyncio.wait({self._task}, timeout=self.wait_s)
        if self._unresponsive():
            self._record(False, time.monotonic())

    def _unresponsive(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and time.monotonic() - self._task_started_at > self.unresponsive_s
        )

    @property
    def ready(self) -> bool:
        return self._ready and not self._unresponsive()

    @property
    def alive(self) -> bool:
        if self.ready or not self.ever_ready or self.failing_since is None:
            return True
        return time.monotonic() - self.failing_since <= self.grace_s


class ProbeMiddleware:
    """``/readyz``: 200 when the model service is ready, else 503; ``/livez``/``/healthz``:
    503 once the model service has been gone longer than the grace period."""

    def __init__(self, app: ASGIApp, probe: ModelProbe) -> None:
        self.app = app
        self.probe = probe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in PROBE_METHODS:
            refusal = error_response(
                405,
                None,
                f"{scope['path']} answers GET and HEAD, not {scope['method'][:20]}",
                {"Allow": ", ".join(sorted(PROBE_METHODS))},
            )
            await refusal(scope, receive, send)
            return
        await self.probe.poll()
        if scope["path"] == "/readyz":
            ok, message = self.probe.ready, "model service is loading or restarting"
        else:
            ok = self.probe.alive
            message = f"model service unreachable or not ready for over {self.probe.grace_s:g} s"
        if ok:
            response: Any = JSONResponse({"status": "ok"})
        else:
            response = error_response(503, None, message, {"Retry-After": "5"})
        await response(scope, receive, send)


# ----------------------------------------------------------------- routing guard
@dataclass(frozen=True)
class RouteTable:
    """The paths the service answers; what each POST route accepts."""

    json_routes: frozenset[str]
    multipart_routes: frozenset[str]
    other_paths: frozenset[str]
    prefixes: tuple[str, ...] = ()

    def known(self, path: str) -> bool:
        return (
            path in self.json_routes
            or path in self.multipart_routes
            or path in self.other_paths
            or path in PROBE_PATHS
            or path.startswith(self.prefixes)
        )


def static_paths(mount_path: str, app: StaticFiles) -> set[str]:
    """The paths a StaticFiles mount answers 200: its files (and its root, with html=True).

    Listed once, when the app is built: the served folders ship with the code. Every
    other path under the mount is a 404 answered before BentoML's per-path metrics,
    so their labels come from this fixed set, never from a URL a client made up.
    """
    root = mount_path.rstrip("/")
    directories = [Path(d) for d in (app.all_directories or []) if Path(d).is_dir()]
    paths = {
        f"{root}/{path.relative_to(directory).as_posix()}"
        for directory in directories
        for path in directory.rglob("*")
        if path.is_file()
    }
    if app.html:
        paths |= {root + "/", *(p.removesuffix("index.html") for p in paths)}
    return paths


def route_paths(routes: Iterable[BaseRoute], prefix: str = "") -> tuple[set[str], list[str]]:
    """Exact paths and path prefixes of Starlette routes, mounted apps included."""
    paths: set[str] = set()
    prefixes: list[str] = []
    for route in routes:
        if isinstance(route, Route):
            paths.add(prefix + route.path)
        elif isinstance(route, Mount):
            inner = getattr(route.app, "routes", None)
            mount_path = prefix + route.path
            if isinstance(route.app, StaticFiles):
                paths |= static_paths(mount_path, route.app)
            elif inner is None:
                prefixes.append(mount_path.rstrip("/") + "/")
            else:
                sub_paths, sub_prefixes = route_paths(inner, mount_path.rstrip("/"))
                paths |= sub_paths
                prefixes += sub_prefixes
    return paths, prefixes


class RouteGuardMiddleware:
    """404 for unknown paths (before BentoML's per-path metrics); 415 for wrong bodies."""

    def __init__(self, app: ASGIApp, routes: RouteTable) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not self.routes.known(path):
            await error_response(404, None, f"no such path: {path[:100]!r}")(scope, receive, send)
            return
        if scope["method"] == "POST":
            content_type = _header(scope, b"content-type").split(";")[0].strip().lower()
            if path in self.routes.json_routes and content_type not in ("", "application/json"):
                response = error_response(
                    415, "content-type", f"send application/json, not {content_type!r}"
                )
                await response(scope, receive, send)
                return
            if path in self.routes.multipart_routes and content_type != "multipart/form-data":
                response = error_response(
                    415, "content-type", f"send multipart/form-data, not {content_type!r}"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- auth
class ApiKeyMiddleware:
    """Bearer-token check on every route but probes and metrics (when a key is set)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        # compare_digest takes as long for a wrong key as for a nearly right one.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.expected
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in PUBLIC_PATHS
            or is_ui_path(scope["path"])  # the playground's files; the page asks for the key
            or scope["method"] == "OPTIONS"  # CORS preflight carries no credentials
        ):
            await self.app(scope, receive, send)
            return
        if not self.authorized(_header(scope, b"authorization")):
            response = error_response(
                401,
                "authorization",
                "missing or wrong API key (expected 'Authorization: Bearer <key>')",
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- body size
class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``: declared (Content-Length) or counted as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, scope: Scope) -> Any:
        field_name = "audio" if scope["path"].rstrip("/") == "/audio_to_audio" else "body"
        limit_mb = (self.max_bytes - UPLOAD_OVERHEAD_BYTES) / 2**20
        return error_response(
            413, field_name, f"request body over the {limit_mb:.1f} MiB upload limit"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope)(scope, receive, send)
            return
        received = 0
        overflowed = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflowed = True
                    raise BodyTooLarge(f"body over {self.max_bytes} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflowed and not started:
                return  # the app's own error for the aborted read; ours follows
            started = True
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if overflowed and not started:
            await self._too_large(scope)(scope, receive, send)


# ------------------------------------------------------------------ error shaping
class ErrorShapeMiddleware:
    """Rewrites error bodies not in the service's shape; adds ``Retry-After`` to 429/503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def shaping_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    await send(message)
                    return
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            size = sum(len(chunk) for chunk in chunks)
            if message.get("more_body", False) and size <= _MAX_SHAPED_BODY:
                return
            body = b"".join(chunks)
            new_start, new_body = _reshape(start, body, more=message.get("more_body", False))
            start = None
            await send(new_start)
            await send({**message, "body": new_body})

        await self.app(scope, receive, shaping_send)


def _reshape(start: Message, body: bytes, more: bool) -> tuple[Message, bytes]:
    status = int(start["status"])
    headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length",)]
    names = {k.lower() for k, _ in headers}
    if status in RETRY_AFTER_S and b"retry-after" not in names:
        headers.append((b"retry-after", str(RETRY_AFTER_S[status]).encode()))
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if not more and not content_type.startswith(b"audio/"):
        try:
            parsed: Any = json.loads(body) if content_type.startswith(b"application/json") else None
        except ValueError:
            parsed = None
        if parsed is None:
            parsed = {"error": body.decode("utf-8", "replace").strip()}
        shaped = shape_error_body(status, parsed)
        if shaped is not None:
            body = json.dumps(shaped).encode()
            headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
            headers.append((b"content-type", b"application/json"))
    if not more:
        headers.append((b"content-length", str(len(body)).encode()))
    return {**start, "headers": headers}, body


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


# ---------------------------------------------------------- BentoML input closures
def close_bentoml_input_paths() -> None:
    """Patch four BentoML (1.4) input paths a public server must not have.

    Call before the services are declared: BentoML binds the file decoder then.

    - A multipart file field sent as a text value is fetched as a URL
      (``MultipartSerde.ensure_file``): refuse it (400) instead.
    - Multipart text fields are parsed as JSON, so the prompt ``1984``, ``true`` or
      ``null`` is refused and ``"quoted"`` loses its quotes: take them as sent.
    - Starlette's 400 for a malformed multipart body surfaces as a 500: re-raise it
      as BentoML's 400 (``BadInput``).
    - The client's file name becomes the temp file's suffix (a 300-character name
      fails with ENAMETOOLONG): keep only a short extension.
    """
    from _bentoml_impl import serde
    from _bentoml_sdk import validators
    from bentoml.exceptions import BadInput
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    multipart = serde.MultipartSerde
    if getattr(multipart, "_riffusion_hardened", False):
        return

    async def ensure_file(obj: Any) -> Any:
        if isinstance(obj, UploadFile):
            return obj
        raise BadInput("file fields take an uploaded file, not text (URLs are not fetched)")

    async def parse_request_as_sent(self: Any, request: Any, cls: Any) -> Any:
        try:
            form = await request.form()
        except (MultiPartException, HTTPException) as exc:
            raise BadInput(
                f"body: malformed multipart body: {getattr(exc, 'detail', exc)}"
            ) from exc
        data: dict[str, Any] = {}
        for name in form:
            values = form.getlist(name)
            if name in cls.multipart_fields:
                if any(not isinstance(value, UploadFile) for value in values):
                    raise BadInput(
                        f"{name}: must be an uploaded file, not text (URLs are not fetched)"
                    )
                data[name] = values if _takes_a_list(cls, name) else values[0]
                continue
            value = form[name]
            if isinstance(value, UploadFile):
                raise BadInput(f"{name}: must be text, not an uploaded file")
            # As typed: never parsed as JSON (BentoML's way: '1984' or 'null' as a prompt
            # failed, '"quoted"' lost its quotes); the model's types convert numbers.
            data[name] = value
        return cls.model_validate(data)

    decode = validators.FileSchema.decode

    def decode_short_name(self: Any, obj: Any) -> Any:
        if isinstance(obj, UploadFile) and obj.filename:
            suffix = obj.filename.rpartition(".")[2] if "." in obj.filename else ""
            obj.filename = f"upload.{suffix[:8]}" if suffix.isalnum() else "upload"
        return decode(self, obj)

    multipart.ensure_file = staticmethod(ensure_file)
    multipart.parse_request = parse_request_as_sent
    validators.FileSchema.decode = decode_short_name
    multipart._riffusion_hardened = True


def _takes_a_list(cls: Any, name: str) -> bool:
    """Whether the IO model's file field ``name`` is a list (``list[Path]``, optional or not)."""
    from typing import get_args

    from _bentoml_sdk.typing_utils import is_list_type, is_union_type

    annotation = cls.model_fields[name].annotation
    if is_union_type(annotation):
        annotation = get_args(annotation)[0]
    return bool(is_list_type(annotation))


def log_client_errors_in_one_line() -> None:
    """BentoML logs every failed request with a traceback at ERROR, a client's 400 too.

    A client error (invalid input: pydantic's ValidationError, BentoML's 4xx exceptions)
    becomes one INFO line naming the route and the reason; server faults keep their
    traceback at ERROR.
    """
    import sys

    from _bentoml_impl.server import app as bentoml_app
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    original = bentoml_app.log_exception
    if getattr(original, "_riffusion_wrapped", False):
        return

    def log_exception(request: Any, exc_info: Any = True) -> None:
        error = sys.exc_info()[1]
        status = 400 if isinstance(error, ValidationError) else None
        if isinstance(error, BentoMLException) and int(error.error_code) < 500:
            status = int(error.error_code)
        if status is None:
            original(request, exc_info)
            return
        if isinstance(error, ValidationError):
            reason = "; ".join(
                f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
                for item in error.errors(include_url=False)[:3]
            )
        else:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        path = request.url.path
        logger.info("client error %d on %s %s: %s", status, request.method, path, reason[:300])

    log_exception._riffusion_wrapped = True  # type: ignore[attr-defined]
    bentoml_app.log_exception = log_exception


# ---------------------------------------------------------------------- install
def install(
    service: Any,
    *,
    cors_origins: list[str],
    api_key: str | None,
    max_body_bytes: int,
    liveness_grace_s: float,
    model_ready: Callable[[], Awaitable[bool]],
    request_timeout_s: float,
    drain: ShutdownDrain,
    header_timeout_s: float = 10.0,
    max_connections: int = 512,
    spec_hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> ModelProbe:
    """Put this module's two layers around BentoML's middleware for ``service`` (a
    bentoml.Service), and answer the ``ApiError`` its endpoints raise.

    BentoML builds the app when a worker starts (after importing service.py): its
    app factory is wrapped so that, for this service only, the outer stack goes first;
    the inner one is the service's own middleware (``add_asgi_middleware``). The CORS
    configuration and every middleware of the API service are here.
    """
    from _bentoml_impl.server.app import ServiceAppFactory

    close_bentoml_input_paths()
    answer_api_errors(service)
    # BentoML's server logging passes INFO for its own loggers only (the root is at
    # WARNING): the service's INFO lines (client errors, restarts) need this.
    service_logger = logging.getLogger("riffusion")
    if service_logger.level == logging.NOTSET:
        service_logger.setLevel(logging.INFO)
    log_client_errors_in_one_line()
    bound_connections(header_timeout_s, max_connections)
    install_model_service(service, request_timeout_s=request_timeout_s, drain=drain)
    probe = ModelProbe(model_ready, grace_s=liveness_grace_s)
    original_call = ServiceAppFactory.__call__
    if getattr(original_call, "_riffusion_wrapped", False):
        original_call = original_call.__wrapped__

    def build(factory: Any) -> Any:
        app = original_call(factory)
        if factory.service.name != service.name:
            return app
        json_routes, multipart_routes = set(), set()
        for api in factory.service.apis.values():
            if getattr(api.input_spec, "multipart_fields", None):
                multipart_routes.add(api.route)
            else:
                json_routes.add(api.route)
        paths, prefixes = route_paths(app.routes)
        table = RouteTable(
            json_routes=frozenset(json_routes),
            multipart_routes=frozenset(multipart_routes),
            other_paths=frozenset(paths | BENTOML_PATHS),
            prefixes=tuple(prefixes),
        )
        stack = [
            Middleware(
                CORSMiddleware,
                allow_origins=cors_origins,
                allow_methods=CORS_METHODS,
                allow_headers=["*"],
                expose_headers=CORS_EXPOSE_HEADERS,
            ),
            Middleware(ErrorShapeMiddleware),
            Middleware(ProbeMiddleware, probe=probe),
            Middleware(ForgetDeadOnScrape),
            Middleware(RouteGuardMiddleware, routes=table),
        ]
        if api_key:
            stack.append(Middleware(ApiKeyMiddleware, api_key=api_key))
        if spec_hook is not None:
            stack.append(Middleware(OpenAPIMiddleware, service=factory.service, hook=spec_hook))
        stack.append(Middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes))
        app.user_middleware[0:0] = stack
        return app

    build._riffusion_wrapped = True  # type: ignore[attr-defined]
    build.__wrapped__ = original_call  # type: ignore[attr-defined]
    ServiceAppFactory.__call__ = build
    return probe


def bentoml_http_config(cors_origins: list[str]) -> dict[str, Any]:
    """The service decorator's ``http`` argument: BentoML's CORS with this module's settings."""
    return {
        "cors": {
            "enabled": True,
            "access_control_allow_origins": cors_origins,
            "access_control_allow_methods": CORS_METHODS,
            "access_control_allow_headers": ["*"],
            "access_control_expose_headers": CORS_EXPOSE_HEADERS,
        }
    }


def answer_api_errors(service: Any) -> None:
    """Make ``service``'s async endpoints answer the ``ApiError`` they raise in this
    module's error shape (BentoML would answer any exception as a bare 500)."""
    for api in service.apis.values():
        if inspect.iscoroutinefunction(api.func) and not hasattr(api.func, "__wrapped__"):
            api.func = _answering_errors(service, api.func)


def _answering_errors(service: Any, func: Callable[..., Awaitable[Any]]) -> Any:
    @functools.wraps(func)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except ApiError as error:
            # An endpoint taking ctx is answered with ctx's status code.
            service.context.response.status_code = error.status
            return error.response()

    return endpoint


class OpenAPIMiddleware:
    """``GET /docs.json``: BentoML's spec completed by ``hook`` (error answers, GET routes)."""

    def __init__(
        self, app: ASGIApp, service: Any, hook: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        self.app = app
        self.service = service
        self.hook = hook
        self._spec: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        if self._spec is None:
            self._spec = json.dumps(self.hook(self.service.openapi_spec.asdict())).encode()
        await Response(self._spec, media_type="application/json")(scope, receive, send)


def install_model_service(service: Any, *, request_timeout_s: float, drain: ShutdownDrain) -> None:
    """The inner layer (8, 9) for ``service``: the model service's only middleware."""
    service.add_asgi_middleware(RequestLifetime, default_timeout_s=request_timeout_s)
    service.add_asgi_middleware(DrainOnShutdown, drain=drain)
