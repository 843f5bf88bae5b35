"""Calls from the API service to the model service, and what each side makes of them.

API side: ``ModelClient.generate`` sends every clip of a request as its own call
(so the model service can batch clips of concurrent requests), with the request's
remaining time as the clip's deadline. If the request goes away (client
disconnect, timeout, a sibling clip failing), the clips still running are
cancelled in the model service, so they stop using the UNet within one step.

Model side (``run_in_engine``, the one path in every batching mode): every job gets
a ``ModelReply``, a clip or a typed error; the engine fails a bad job alone, and a
job the model would refuse (a prompt over the tokenizer's limit) is refused before
it enters the engine, naming the job field. Torch is imported there only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio

from riffusion.api_schemas import (
    ListenerDecision,
    ModelAudio,
    ModelError,
    ModelReply,
    ModelRequest,
    ModelResult,
    error_reply,
)
from riffusion.audio import Audio
from riffusion.contracts import JobFieldError
from riffusion.schemas import GenerationJob
from serving.errors import ApiError
from serving.metrics import CLIP_LATENCY, CLIPS_IN_FLIGHT
from serving.request_lifetime import REQUEST_DEADLINE

if TYPE_CHECKING:
    from riffusion.engine import Engine, EngineJob
    from riffusion.listeners import ListenerAdmission
    from riffusion.pipeline import GeneratedClip
    from riffusion.prompts import PromptEncoder

logger = logging.getLogger(__name__)


class ModelCallError(Exception):
    """A clip failed; ``error`` says how the API should answer."""

    def __init__(self, error: ModelError) -> None:
        super().__init__(error.message)
        self.error = error

    def api_error(self, request_fields: dict[str, str] | None = None) -> ApiError:
        """The API's answer for it; ``request_fields`` maps the job field the model service
        named (``start.prompt``) to the request's own (``prompt``); unmapped ones stay."""
        error = self.error
        field = (request_fields or {}).get(error.field, error.field) if error.field else None
        return ApiError(error.status, field, error.message, error.retry_after_s)


# --- model side --------------------------------------------------------------------------------


def check_prompt_tokens(encoder: PromptEncoder, job: GenerationJob) -> None:
    """Raise ``JobFieldError`` for the first prompt of ``job`` its real tokenizer cannot fit.

    The API only checks a tokenizer-free lower bound; this counts the model's own
    tokens (cached, so the job's later embedding does not tokenise again).
    """
    from riffusion.prompts import PromptTooLongError  # torch: the model service only

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


def model_job(request: ModelRequest) -> GenerationJob:
    """The job to run: an audio-to-audio job starts from its source clip's spectrogram."""
    from riffusion.riff import with_init_image  # torch: the model service only

    if request.init_audio is None:
        return request.job
    return with_init_image(request.job, request.init_audio.audio())


def model_result(clip: GeneratedClip) -> ModelResult:
    """The clip as sent back to the API service: lossless PNG and float32 samples."""
    from riffusion.spectrogram import encode_image  # torch: the model service only

    return ModelResult.from_parts(
        encode_image(clip.image), clip.audio, clip.timings, clip.batch_size
    )


async def run_in_engine(
    engine: Engine,
    encoder: PromptEncoder,
    requests: Sequence[ModelRequest],
    admission: ListenerAdmission | None = None,
) -> list[ModelReply]:
    """The model service's one path for jobs, in every batching mode; a reply per request.

    1. each job is made runnable (``model_job``) and checked against the model's own
       tokenizer; one that fails is answered at once and never joins a batch;
    2. the others enter the engine together (``Engine.submit_together``), each with its
       deadline, id, the time it already waited since the API service sent it and, for a
       listener's clip, when it is due; ``admission`` renews that listener's place, or
       counts a per-request clip against new listeners;
    3. each is answered with its clip or its error: the engine fails a job alone.
    """

    def runnable(request: ModelRequest) -> GenerationJob | Exception:
        try:
            job = model_job(request)
            check_prompt_tokens(encoder, job)
        except Exception as error:
            return error
        return job

    jobs = await anyio.to_thread.run_sync(lambda: [runnable(r) for r in requests])
    if admission is not None:
        _account(admission, requests, jobs)
    now = time.time()
    submitted = iter(
        engine.submit_together(
            [
                (
                    job,
                    request.timeout_s,
                    request.job_id or None,
                    now - request.submitted_at,
                    request.due_s,
                    request.listener_id is not None,  # an admitted listener: promised
                )
                for request, job in zip(requests, jobs, strict=True)
                if not isinstance(job, Exception)
            ]
        )
    )
    outcomes = [job if isinstance(job, Exception) else next(submitted) for job in jobs]
    return list(await asyncio.gather(*(_answer(outcome) for outcome in outcomes)))


def _account(
    admission: ListenerAdmission,
    requests: Sequence[ModelRequest],
    jobs: Sequence[GenerationJob | Exception],
) -> None:
    for request, job in zip(requests, jobs, strict=True):
        if isinstance(job, Exception):
            continue
        if request.listener_id is None or not admission.renew(request.listener_id):
            admission.note_request(admission.demand(job))


async def _answer(outcome: EngineJob | BaseException) -> ModelReply:
    if isinstance(outcome, BaseException):
        return error_reply(outcome)
    try:
        clip = await asyncio.wrap_future(outcome.future)
    except BaseException as error:  # cancelled here too: the engine sees the future go
        return error_reply(error)
    # PNG encoding takes tens of milliseconds: off the event loop, which takes new jobs.
    return ModelReply(result=await anyio.to_thread.run_sync(model_result, clip))


# --- API side ----------------------------------------------------------------------------------


# Strong references to fire-and-forget cancel calls (asyncio keeps only weak ones); module
# level because a ModelClient lives only as long as its request.
_PENDING_CANCELS: set[asyncio.Task[Any]] = set()


class ModelClient:
    """The API service's handle on the model service (``bentoml.depends`` object)."""

    def __init__(self, model: Any, adaptive: bool, default_timeout_s: float) -> None:
        self.model = model
        self.adaptive = adaptive  # the model service exposes submit_batch, not submit
        self.default_timeout_s = default_timeout_s

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        init_audio: Sequence[Audio] | None = None,
        *,
        due_s: float | None = None,
        listener_id: str | None = None,
    ) -> list[ModelResult]:
        """One result per job, in order; raises ``ModelCallError`` for the first clip that fails.

        ``init_audio``: each job's source clip (audio-to-audio), made into its init image
        by the model service. ``due_s``: when the clips are due (a web-app clip when it has
        played); with ``listener_id``, an admitted listener's clip, due when their buffer
        runs dry and served before every clip not a listener's. Clips run concurrently;
        when one fails or the caller is cancelled, the others are cancelled too (in the
        model service as well).
        """
        deadline = REQUEST_DEADLINE.get() or time.monotonic() + self.default_timeout_s
        clips: Sequence[Audio | None] = init_audio if init_audio is not None else [None] * len(jobs)
        listener = {"due_s": due_s, "listener_id": listener_id}
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._one(job, clip, deadline, listener))
                    for job, clip in zip(jobs, clips, strict=True)
                ]
        except* ModelCallError as failures:
            raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _one(
        self, job: GenerationJob, clip: Audio | None, deadline: float, listener: dict[str, Any]
    ) -> ModelResult:
        sent = time.perf_counter()
        request = ModelRequest(
            job=job,
            submitted_at=time.time(),
            job_id=uuid.uuid4().hex,
            timeout_s=max(0.0, deadline - time.monotonic()),
            init_audio=ModelAudio.from_audio(clip) if clip is not None else None,
            **listener,
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
                if self.adaptive:
                    [answer] = await self.model.to_async.submit_batch([request])
                else:
                    answer = await self.model.to_async.submit(request)
                return ModelReply.model_validate(answer)
            except aiohttp.ClientConnectionError as error:
                # BentoML's client can reuse a pooled connection the model service already
                # closed (bentoml/BentoML#4971). Jobs are deterministic: one retry is safe.
                if attempt == 2:
                    logger.warning("model service unreachable after a retry: %r", error)
                    raise _unavailable(
                        "the model service is not answering (restarting?); retry shortly"
                    ) from error
                logger.warning(
                    "model service connection dropped (%r); retrying the clip once", error
                )
            except TimeoutError as error:
                raise ModelCallError(
                    ModelError(status=504, message="the model service timed out")
                ) from error
            except BentoMLException as error:
                if error.error_code in _UNAVAILABLE_MESSAGES:
                    raise _unavailable(_UNAVAILABLE_MESSAGES[error.error_code]) from error
                raise
        raise AssertionError("unreachable")

    async def open_listener(self, listener_id: str, job: GenerationJob) -> ListenerDecision:
        """Ask the model service for a real-time listener's place (answered at once)."""
        answer = await self.model.to_async.open_listener(listener_id=listener_id, job=job)
        return ListenerDecision.model_validate(answer)

    async def close_listener(self, listener_id: str) -> None:
        await self.model.to_async.close_listener(listener_id=listener_id)

    def _cancel_in_model(self, job_id: str) -> None:
        """Tell the model service to drop ``job_id`` (fire and forget)."""

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
