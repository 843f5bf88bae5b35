"""Calls from the API service to the model service, and what each side makes of them.

API side: ``ModelClient.generate`` sends every clip of a request as its own call
(so the model service can batch clips of concurrent requests), with the request's
remaining time as the clip's deadline. If the request goes away (client
disconnect, timeout, a sibling clip failing), the clips still running are
cancelled in the model service, so they stop using the UNet within one step.

Model side: every job gets a ``ModelReply``, a clip or a typed error, so one bad
job never fails its batch-mates; a job the model would refuse (a prompt over the
tokenizer's limit) is refused before it enters the batch, naming the job field.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from pydantic import BaseModel, Field

from riffusion.api_schemas import ModelRequest, ModelResult
from riffusion.schemas import GenerationJob
from serving.metrics import CLIP_LATENCY, CLIPS_IN_FLIGHT
from serving.request_lifetime import REQUEST_DEADLINE

if TYPE_CHECKING:
    from riffusion.prompts import PromptEncoder

logger = logging.getLogger(__name__)

BatchingMode = Literal["continuous", "adaptive", "off"]


class ModelError(BaseModel):
    """Why the model service did not produce a clip, as the HTTP answer the API should give."""

    status: int
    message: str
    retry_after_s: float | None = Field(default=None, description="for 503: when to retry")
    field: str | None = Field(
        default=None, description="the job field at fault, dotted (start.negative_prompt)"
    )


class ModelReply(BaseModel):
    """One job's answer: a clip or an error (never both)."""

    result: ModelResult | None = None
    error: ModelError | None = None


class ModelCallError(Exception):
    """A clip failed; ``error`` says how the API should answer."""

    def __init__(self, error: ModelError) -> None:
        super().__init__(error.message)
        self.error = error


# --- model side --------------------------------------------------------------------------------


class JobFieldError(ValueError):
    """A job the model service refuses before running it; ``field`` is the dotted job field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_prompt_tokens(encoder: PromptEncoder, job: GenerationJob) -> None:
    """Raise ``JobFieldError`` for the first prompt of ``job`` its real tokenizer cannot fit.

    The API only checks a tokenizer-free lower bound; this counts the model's own
    tokens (cached, so the job's later embedding does not tokenise again).
    """
    from riffusion.prompts import PromptTooLongError  # torch: model side only

    for side, prompt_input in (("start", job.start), ("end", job.end)):
        if prompt_input is None:
            continue
        for name in ("prompt", "negative_prompt"):
            text = getattr(prompt_input, name)
            if not text:
                continue
            try:
                encoder.windows_needed(text)
            except PromptTooLongError as error:
                raise JobFieldError(
                    f"{side}.{name}",
                    f"{error.token_count} CLIP tokens long, more than the {error.max_tokens} "
                    "supported; shorten it",
                ) from error


def error_reply(error: BaseException) -> ModelReply:
    """The reply for a job that raised ``error`` (unexpected errors are logged, not echoed)."""
    from riffusion.engine import EngineStopped, JobCancelled, JobExpired, JobRefused
    from riffusion.pipeline import InvalidJobError
    from riffusion.seed_images import UnknownImageError

    if isinstance(error, JobRefused):
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, str(error), error.retry_after_s)
    if isinstance(error, EngineStopped):
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, str(error), 5.0)
    if isinstance(error, JobExpired):
        return _error(HTTPStatus.GATEWAY_TIMEOUT, str(error))
    if isinstance(error, JobFieldError):
        return _error(HTTPStatus.BAD_REQUEST, str(error), field=error.field)
    if isinstance(error, JobCancelled | asyncio.CancelledError):
        # Its caller is normally gone; one still waiting may retry.
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "the clip was cancelled", 1.0)
    if isinstance(error, InvalidJobError | UnknownImageError | ValueError):
        return _error(HTTPStatus.BAD_REQUEST, str(error))
    logger.error("job failed in the model service", exc_info=error)
    return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "the model service failed on this clip")


def _error(
    status: int, message: str, retry_after_s: float | None = None, field: str | None = None
) -> ModelReply:
    return ModelReply(
        error=ModelError(status=status, message=message, retry_after_s=retry_after_s, field=field)
    )


def run_isolated(
    run: Callable[[list[GenerationJob]], list[Any]],
    jobs: Sequence[GenerationJob],
    check: Callable[[GenerationJob], None] | None = None,
) -> list[Any | BaseException]:
    """``run(jobs)``, one outcome per job: a job that fails ``check`` gets its error and
    never joins the batch; if the batch raises, each job runs again alone, so only bad
    jobs fail."""
    outcomes: list[Any | BaseException] = []
    runnable: list[int] = []
    for index, job in enumerate(jobs):
        try:
            if check is not None:
                check(job)
        except Exception as error:
            outcomes.append(error)
            continue
        outcomes.append(None)
        runnable.append(index)
    for index, outcome in zip(runnable, _run_batch(run, [jobs[i] for i in runnable]), strict=True):
        outcomes[index] = outcome
    return outcomes


def _run_batch(
    run: Callable[[list[GenerationJob]], list[Any]], jobs: list[GenerationJob]
) -> list[Any | BaseException]:
    if not jobs:
        return []
    try:
        return list(run(jobs))
    except Exception as error:
        if len(jobs) == 1:
            return [error]
        logger.warning("a batch of %d jobs failed (%s); running them one by one", len(jobs), error)
    outcomes: list[Any | BaseException] = []
    for job in jobs:
        try:
            outcomes.extend(run([job]))
        except Exception as error:
            outcomes.append(error)
    return outcomes


# --- API side ----------------------------------------------------------------------------------


# Strong references to fire-and-forget cancel calls (asyncio keeps only weak ones); module
# level because a ModelClient lives only as long as its request.
_PENDING_CANCELS: set[asyncio.Task[Any]] = set()


class ModelClient:
    """The API service's handle on the model service (``bentoml.depends`` object)."""

    def __init__(self, model: Any, mode: BatchingMode, default_timeout_s: float) -> None:
        self.model = model
        self.mode = mode
        self.default_timeout_s = default_timeout_s

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[ModelResult]:
        """One result per job, in order; raises ``ModelCallError`` for the first clip that fails.

        Clips run concurrently; when one fails or the caller is cancelled, the others
        are cancelled too (in the model service as well).
        """
        deadline = REQUEST_DEADLINE.get() or time.monotonic() + self.default_timeout_s
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._one(job, deadline)) for job in jobs]
        except* ModelCallError as failures:
            raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _one(self, job: GenerationJob, deadline: float) -> ModelResult:
        sent = time.perf_counter()
        request = ModelRequest(
            job=job,
            submitted_at=time.time(),
            job_id=uuid.uuid4().hex,
            timeout_s=max(0.0, deadline - time.monotonic()),
        )
        CLIPS_IN_FLIGHT.inc()
        try:
            reply = await self._call(request)
        except asyncio.CancelledError:
            self._cancel_in_model(request.job_id)
            raise
        finally:
            CLIPS_IN_FLIGHT.dec()
        if reply.error is not None:
            raise ModelCallError(reply.error)
        assert reply.result is not None
        CLIP_LATENCY.observe(time.perf_counter() - sent)
        return reply.result

    async def _call(self, request: ModelRequest) -> ModelReply:
        """One model call; retries once on a dropped pooled connection, maps failures to 503."""
        from bentoml.exceptions import BentoMLException

        for attempt in (1, 2):
            try:
                if self.mode == "continuous":
                    answer = await self.model.to_async.submit(request)
                else:
                    [answer] = await self.model.to_async.generate([request])
                return ModelReply.model_validate(answer)
            except aiohttp.ClientConnectionError as error:
                # BentoML's client can reuse a pooled connection the model service already
                # closed (bentoml/BentoML#4971). Jobs are deterministic: one retry is safe.
                if attempt == 2:
                    logger.warning("model service unreachable after a retry: %r", error)
                    raise _unavailable(
                        "the model service is not answering (restarting?); retry shortly"
                    ) from error
                logger.warning("model service connection dropped; retrying the clip once")
            except TimeoutError as error:
                raise ModelCallError(
                    ModelError(status=504, message="the model service timed out")
                ) from error
            except BentoMLException as error:
                if error.error_code in _UNAVAILABLE_MESSAGES:
                    raise _unavailable(_UNAVAILABLE_MESSAGES[error.error_code]) from error
                raise
        raise AssertionError("unreachable")

    def _cancel_in_model(self, job_id: str) -> None:
        """Tell the model service to drop ``job_id`` (continuous mode; fire and forget)."""
        if self.mode != "continuous":
            return

        async def cancel() -> None:
            try:
                await self.model.to_async.cancel(job_ids=[job_id])
            except Exception as error:  # the job then ends at its deadline instead
                logger.warning("could not cancel job %s in the model service: %r", job_id, error)

        task = asyncio.get_running_loop().create_task(cancel())
        _PENDING_CANCELS.add(task)
        task.add_done_callback(_PENDING_CANCELS.discard)


# What the model service's own refusals mean to the caller (all answered 503 + Retry-After).
_UNAVAILABLE_MESSAGES = {
    HTTPStatus.TOO_MANY_REQUESTS: "the model service is at capacity; retry shortly",
    HTTPStatus.SERVICE_UNAVAILABLE: "the model service is loading or restarting; retry shortly",
    HTTPStatus.GATEWAY_TIMEOUT: "the model service timed out the clip; retry shortly",
}


def _unavailable(message: str) -> ModelCallError:
    return ModelCallError(ModelError(status=503, message=message, retry_after_s=5.0))
