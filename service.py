"""BentoML services: ``RiffusionModel`` (GPU, real-time engine) and ``Riffusion`` (public API).

Thin glue over the ``riffusion`` library. The API service validates requests,
looks up seed images, slices/stitches audio and encodes outputs on CPU; every
clip is sent to the model service as its own call, concurrently, with the
request's deadline. The model service's engine lets each clip join the running
batch at the next denoising step (one UNet call per step for every running
clip) and drops it when its caller goes away (``RIFFUSION_BATCHING``: see README).

Configuration: ``RIFFUSION_*`` environment variables (see README and
``riffusion.api_schemas.ServiceSettings``).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import anyio
import bentoml
from bentoml.validators import ContentType
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from riffusion.api_schemas import (
    AUDIO_MEDIA_TYPES,
    AudioToAudioRequest,
    ClipImage,
    InterpolateRequest,
    InterpolateResponse,
    ModelRequest,
    ModelResult,
    RunInferenceRequest,
    RunInferenceResponse,
    SeedImageList,
    SeedImageModel,
    ServiceSettings,
    TextToAudioRequest,
    data_url,
)
from riffusion.audio import Audio, AudioError, encode_audio, read_audio
from riffusion.engine import EngineStopped, default_postprocess
from riffusion.schemas import GenerationJob, PromptInput, width_for_duration
from riffusion.spectrogram import encode_image
from serving import http
from serving.checkpoint import HubCheckpoint, store_checkpoint
from serving.errors import error_response, failed
from serving.metrics import (
    BATCH_SIZE,
    DENOISE_STEP,
    QUEUE_WAIT,
    EngineMetrics,
    forget_dead_processes,
)
from serving.model_calls import (
    ModelCallError,
    ModelClient,
    ModelReply,
    check_prompt_tokens,
    error_reply,
    run_isolated,
)
from serving.openapi import document_api
from serving.request_lifetime import RequestLifetime
from serving.service_info import describe_service
from serving.startup_checks import announce_when_ready, refuse_tiny_on_gpu, require_api_key
from serving.ui import ui_routes
from serving.worker_temp import use_private_temp_dir

if TYPE_CHECKING:
    from riffusion.pipeline import GeneratedClip

logger = logging.getLogger("riffusion.service")
SETTINGS = ServiceSettings.from_env()
http.close_bentoml_input_paths()


# ---------------------------------------------------------------- model service
@bentoml.service(
    name="riffusion_model",
    resources={"gpu": 1, "gpu_type": "nvidia-a10g"},
    workers=1,
    # concurrency: what one replica is sized for (BentoCloud autoscales above it);
    # max_concurrency: hard cap, beyond which callers get 429 at once.
    traffic={
        "timeout": SETTINGS.request_timeout_s,
        "concurrency": SETTINGS.max_batch_size,
        "max_concurrency": 256,
    },
)
class RiffusionModel:
    """Holds the diffusion pipeline on the accelerator; batches jobs as RIFFUSION_BATCHING says.

    ``continuous`` (default): the real-time engine, fed through ``submit`` and ``cancel``;
    ``adaptive``: BentoML's adaptive batching of ``generate`` calls; ``off``: one at a time.
    """

    # Declared so that the Bento carries the checkpoint (serving/checkpoint.py): a hub id
    # pinned to RIFFUSION_MODEL_REVISION (downloaded into the image by `bentoml
    # containerize`) or a model-store tag (copied in by `bentoml build`, offline).
    # `tiny` and local directories need no declaration.
    checkpoint: Any
    if SETTINGS.is_hub_model:
        checkpoint = HubCheckpoint(
            SETTINGS.model,
            revision=SETTINGS.model_revision or "main",
            exclude=["*.ckpt", "*.safetensors.index.json", "*.bin.index.json"],
        )
    elif SETTINGS.is_store_model:
        checkpoint = store_checkpoint(SETTINGS.model)

    def __init__(self) -> None:
        from riffusion.engine import Engine, EngineConfig  # heavy: torch, diffusers
        from riffusion.pipeline import RiffusionPipeline

        forget_dead_processes()  # a restarted worker must not inherit its predecessor's gauges
        use_private_temp_dir()  # and removes the temp folders of dead workers
        source = SETTINGS.model
        if SETTINGS.is_hub_model:
            source = str(self.checkpoint)  # the pinned snapshot (in the image, or downloaded)
        elif SETTINGS.is_store_model:
            source = self.checkpoint.path  # inside the Bento's own model store
        self.pipeline = RiffusionPipeline.load(
            source, device=SETTINGS.device, unet_backend=SETTINGS.unet_backend
        )
        refuse_tiny_on_gpu(self.pipeline.describe(), SETTINGS.allow_tiny_on_gpu)
        self.warm_up_s = self.pipeline.warm_up()  # before ready: the first request pays nothing
        self.metrics = EngineMetrics(self.pipeline.unet_forward)
        self.engine: Engine | None = None
        if SETTINGS.batching == "continuous":
            config = EngineConfig(
                max_batch_size=SETTINGS.max_batch_size,
                postprocess=SETTINGS.postprocess or default_postprocess(self.pipeline.device),
                default_timeout_s=SETTINGS.request_timeout_s,
            )
            self.engine = Engine(self.pipeline, config, self.metrics)
        # adaptive/off: never two batches at once (workers=1); the lock also covers
        # in-process use, where calls arrive from a thread pool.
        self._lock = threading.Lock()
        logger.info("Riffusion model loaded: %s", self._description())

    def __is_ready__(self) -> bool:
        return getattr(self, "pipeline", None) is not None

    @bentoml.on_shutdown
    def _stop_engine(self) -> None:
        """Finish the jobs in flight (within the grace period), then stop the engine."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout_s=SETTINGS.shutdown_grace_s)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Model id, tiny or not, device, dtype, UNet backend and batching of the loaded model.

        Async: it runs on the event loop and never waits behind a running generation.
        """
        return self._description()

    def _description(self) -> dict[str, Any]:
        return {
            **self.pipeline.describe(),
            "batching": SETTINGS.batching,
            "max_batch_size": SETTINGS.max_batch_size,
            "warm_up_s": round(self.warm_up_s, 3),
        }

    @bentoml.api
    async def submit(self, request: ModelRequest) -> ModelReply:
        """Continuous batching: run one job in the engine, joining at the next step.

        A job the model cannot take (a prompt over its tokenizer's limit) is refused here,
        before it enters the engine.
        """
        if self.engine is None:
            return error_reply(EngineStopped(f"RIFFUSION_BATCHING={SETTINGS.batching}: no engine"))
        try:
            check_prompt_tokens(self.pipeline.prompt_encoder, request.job)
            entry = self.engine.submit(request.job, request.timeout_s, request.job_id)
        except Exception as error:
            return error_reply(error)
        try:
            clip = await asyncio.wrap_future(entry.future)
        except BaseException as error:  # cancelled here too: the engine sees the future go
            return error_reply(error)
        return ModelReply(result=model_result(clip))

    @bentoml.api
    def cancel(self, job_ids: list[str]) -> int:
        """Drop these jobs at the next step boundary; answers how many were still running."""
        if self.engine is None:
            return 0
        return sum(self.engine.cancel(job_id) for job_id in job_ids)

    @bentoml.api(
        batchable=SETTINGS.batching == "adaptive",
        max_batch_size=max(2, SETTINGS.max_batch_size),
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def generate(self, requests: list[ModelRequest]) -> list[ModelReply]:
        """Adaptive batching (or none): one clip per request, a failing job fails alone.

        Jobs the model cannot take (a prompt over its tokenizer's limit) are answered
        before the batch runs, which then holds only the others.
        """
        started = time.time()
        BATCH_SIZE.observe(len(requests))
        for request in requests:
            QUEUE_WAIT.observe(max(0.0, started - request.submitted_at))
        check = functools.partial(check_prompt_tokens, self.pipeline.prompt_encoder)
        with self._lock:
            outcomes = run_isolated(
                self.pipeline.run, [request.job for request in requests], check=check
            )
        replies = []
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self.metrics.on_outcome("failed", 0)
                replies.append(error_reply(outcome))
                continue
            outcome.timings["queue"] = max(0.0, started - request.submitted_at)
            self.metrics.on_outcome("completed", 2 * outcome.steps)
            DENOISE_STEP.observe(outcome.timings.get("denoise_per_step", 0.0))
            replies.append(ModelReply(result=model_result(outcome)))
        return replies


def model_result(clip: GeneratedClip) -> ModelResult:
    """The clip as sent back to the API service: lossless PNG and float32 samples."""
    return ModelResult.from_parts(
        encode_image(clip.image), clip.audio, clip.timings, clip.batch_size
    )


# --------------------------------------------------------------- extra routes
async def _get_seed_images(request: Request) -> Response:
    kind = request.query_params.get("kind")
    if kind not in (None, "seed", "mask"):
        return error_response(400, "kind", f"must be 'seed' or 'mask', got {kind!r}")
    service = bentoml.get_current_service()
    listing = service.seed_image_list(kind)
    return JSONResponse(listing.model_dump())


async def _get_model_info(request: Request) -> Response:
    service = bentoml.get_current_service()
    return JSONResponse(await service.model_info())


extra_routes = Starlette(
    routes=[
        Route("/seed_images", _get_seed_images, methods=["GET"]),
        Route("/model_info", _get_model_info, methods=["GET"]),
        *ui_routes(),
    ]
)


# ------------------------------------------------------------------ API service
AudioFile = Annotated[Path, ContentType("audio/*")]
# Job fields (as the model service names them in errors) -> the endpoints' request fields;
# /run_inference/ and /interpolate take start/end prompt inputs as jobs do.
TEXT_TO_AUDIO_FIELDS = {"start.prompt": "prompt", "start.negative_prompt": "negative_prompt"}
AUDIO_TO_AUDIO_FIELDS = {
    **TEXT_TO_AUDIO_FIELDS,
    "end.prompt": "end_prompt",
    "end.negative_prompt": "negative_prompt",
}


@bentoml.asgi_app(extra_routes, path="/")
@bentoml.service(
    name="riffusion",
    resources={"cpu": "2"},
    # The Bento records the model it was built for (a tiny build runs tiny);
    # BentoML takes the entry service's envs into the Bento.
    envs=[{"name": "RIFFUSION_MODEL", "value": SETTINGS.model}],
    workers=1,
    traffic={
        "timeout": SETTINGS.request_timeout_s,
        "concurrency": max(1, SETTINGS.max_concurrency // 2),
        "max_concurrency": SETTINGS.max_concurrency,
    },
    http={
        "cors": {
            "enabled": True,
            "access_control_allow_origins": SETTINGS.cors_origins,
            "access_control_allow_methods": ["GET", "POST", "OPTIONS"],
            "access_control_allow_headers": ["*"],
            "access_control_expose_headers": ["X-Riffusion-Pipeline-Seconds"],
        }
    },
)
class Riffusion:
    """Public HTTP API: web-app endpoint, text/audio-to-audio, interpolation, seed images."""

    model = bentoml.depends(RiffusionModel)

    def __init__(self) -> None:
        from riffusion.seed_images import SeedImageLibrary

        use_private_temp_dir()  # before the model client makes its temp folder
        self.seed_images = SeedImageLibrary()
        self._model_info: dict[str, Any] | None = None

    @bentoml.on_startup
    def _announce_ready(self) -> None:
        """One log line when the model service turns ready (see serving/startup_checks.py)."""
        self._ready_announcement = asyncio.get_running_loop().create_task(
            announce_when_ready(_model_ready, self.model_info)
        )

    # ---------------------------------------------------------------- helpers
    async def model_info(self) -> dict[str, Any]:
        """The model service's description, fetched once: it does not change while serving."""
        if self._model_info is None:
            self._model_info = await self.model.to_async.describe()
        return self._model_info

    def seed_image_list(self, kind: str | None) -> SeedImageList:
        return SeedImageList(
            seed_images=[
                SeedImageModel(
                    id=info.id,
                    kind=info.kind,
                    tempo_bpm=info.tempo_bpm,
                    description=info.description,
                )
                for info in self.seed_images.list(kind)
            ]
        )

    def _check_image_id(self, image_id: str | None, kind: str, field: str) -> Any | None:
        """Error response when ``image_id`` is not in the library (ids never reach the disk)."""
        from riffusion.seed_images import UnknownImageError

        if image_id is None:
            return None
        try:
            self.seed_images.info(image_id, kind=kind)
        except UnknownImageError as exc:
            return error_response(400, field, str(exc))
        return None

    def _check_image_ids(self, seed_image_id: str | None, mask_image_id: str | None) -> Any | None:
        """The first error response for an unknown seed or mask id, if any."""
        seed_error = self._check_image_id(seed_image_id, "seed", "seed_image_id")
        if seed_error is not None:
            return seed_error
        return self._check_image_id(mask_image_id, "mask", "mask_image_id")

    async def _generate_or_error(
        self, jobs: Sequence[GenerationJob], request_fields: dict[str, str] | None = None
    ) -> tuple[list[ModelResult], Any | None]:
        """The jobs' results, or the error response of the first clip that failed.

        ``request_fields`` maps the job fields the model service may name in an error
        (``start.prompt``) to the request's own (``prompt``); unmapped ones are named as is.
        """
        client = ModelClient(self.model, SETTINGS.batching, SETTINGS.request_timeout_s)
        try:
            return await client.generate(jobs), None
        except ModelCallError as failure:
            error = failure.error
            headers = {}
            if error.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
            field = (request_fields or {}).get(error.field, error.field) if error.field else None
            return [], error_response(error.status, field, error.message, headers or None)

    @staticmethod
    def _timing_headers(results: Sequence[ModelResult]) -> dict[str, str]:
        pipeline_s = max((r.timings.get("total", 0.0) for r in results), default=0.0)
        queue_s = max((r.timings.get("queue", 0.0) for r in results), default=0.0)
        return {
            "X-Riffusion-Pipeline-Seconds": f"{pipeline_s:.6f}",
            "X-Riffusion-Queue-Seconds": f"{queue_s:.6f}",
            "X-Riffusion-Batch-Size": str(max((r.batch_size for r in results), default=0)),
        }

    @staticmethod
    def _audio_response(audio: Audio, fmt: str, filename: str, headers: dict[str, str]) -> Any:
        payload = encode_audio(audio, fmt)
        return Response(
            payload,
            media_type=AUDIO_MEDIA_TYPES[fmt],
            headers={
                **headers,
                "Content-Disposition": f'attachment; filename="{filename}.{fmt}"',
                "X-Riffusion-Duration-Seconds": f"{audio.duration_s:.3f}",
            },
        )

    # -------------------------------------------------------------- endpoints
    @bentoml.api(route="/run_inference/", input_spec=RunInferenceRequest)
    async def run_inference(self, ctx: bentoml.Context, **fields: Any) -> RunInferenceResponse:
        """The riffusion web app's endpoint: JPEG spectrogram and MP3 audio as data URLs.

        Hear it in the browser: the playground page at [/ui](/ui).
        """
        request = RunInferenceRequest.model_validate(fields)
        error = self._check_image_ids(request.seed_image_id, request.mask_image_id)
        if error is not None:
            return failed(ctx, error)
        results, error = await self._generate_or_error([request.to_job()])
        if error is not None:
            return failed(ctx, error)
        [result] = results
        response = await anyio.to_thread.run_sync(_web_app_payload, result)
        ctx.response.metadata.update(self._timing_headers(results))
        return response

    @bentoml.api(route="/text_to_audio", input_spec=TextToAudioRequest)
    async def text_to_audio(self, **fields: Any) -> AudioFile:
        """Generate a clip from a prompt alone; answers the audio file in the chosen format."""
        request = TextToAudioRequest.model_validate(fields)
        job = GenerationJob(
            start=PromptInput(
                prompt=request.prompt,
                seed=request.seed,
                negative_prompt=request.negative_prompt,
                guidance=request.guidance,
            ),
            num_inference_steps=request.num_inference_steps,
            width=width_for_duration(request.duration_s),
            scheduler=request.scheduler,
        )
        results, error = await self._generate_or_error([job], TEXT_TO_AUDIO_FIELDS)
        if error is not None:
            return error
        audio = results[0].audio()
        return await anyio.to_thread.run_sync(
            self._audio_response,
            audio,
            request.format,
            "text_to_audio",
            self._timing_headers(results),
        )

    @bentoml.api(route="/audio_to_audio", input_spec=AudioToAudioRequest)
    async def audio_to_audio(self, **fields: Any) -> AudioFile:
        """Re-imagine an uploaded track clip by clip (clips batched), crossfaded back together.

        The answer is mono, whatever the upload's channels: the model was trained on mono
        spectrograms only, so a stereo track is mixed down before it is riffed (two
        channels riffed apart would drift into two unrelated tracks).
        """
        from riffusion.riff import OVERLAP_S, plan_riff, stitch_clips

        request = AudioToAudioRequest.model_validate(fields)
        size = request.audio.stat().st_size
        if size > SETTINGS.max_upload_bytes:
            limit_mb = SETTINGS.max_upload_bytes / 2**20
            return error_response(413, "audio", f"file over the {limit_mb:.1f} MiB limit")
        try:
            source = await anyio.to_thread.run_sync(_read_upload, request.audio)
        except AudioError as exc:
            # read_audio refuses an over-long file from its header, before decoding it.
            status = 413 if "too long" in str(exc) else 400
            return error_response(status, "audio", str(exc))
        try:
            plan = await anyio.to_thread.run_sync(
                lambda: plan_riff(
                    source,
                    request.start_input(),
                    request.end_input(),
                    num_inference_steps=request.num_inference_steps,
                )
            )
        except AudioError as exc:
            return error_response(400, "audio", str(exc))
        results, error = await self._generate_or_error(plan.jobs, AUDIO_TO_AUDIO_FIELDS)
        if error is not None:
            return error
        # Each result is fitted to its source clip so the riff lines up with the upload.
        audio = stitch_clips([r.audio() for r in results], OVERLAP_S, plan.clip_num_frames)
        headers = {**self._timing_headers(results), "X-Riffusion-Clips": str(len(results))}
        return await anyio.to_thread.run_sync(
            self._audio_response, audio, request.format, "audio_to_audio", headers
        )

    @bentoml.api(route="/interpolate", input_spec=InterpolateRequest)
    async def interpolate(self, ctx: bentoml.Context, **fields: Any) -> InterpolateResponse:
        """Walk alpha 0 -> 1 over N clips on one seed image; one stitched file plus clip images."""
        from riffusion.riff import OVERLAP_S, interpolation_jobs, stitch_clips

        request = InterpolateRequest.model_validate(fields)
        error = self._check_image_ids(request.seed_image_id, request.mask_image_id)
        if error is not None:
            return failed(ctx, error)
        jobs = interpolation_jobs(
            request.start,
            request.end,
            request.num_clips,
            request.seed_image_id,
            request.mask_image_id,
            request.num_inference_steps,
        )
        results, error = await self._generate_or_error(jobs)
        if error is not None:
            return failed(ctx, error)
        audio = stitch_clips([r.audio() for r in results], OVERLAP_S)
        payload = await anyio.to_thread.run_sync(encode_audio, audio, request.format)
        ctx.response.metadata.update(self._timing_headers(results))
        return InterpolateResponse(
            audio=data_url(AUDIO_MEDIA_TYPES[request.format], payload),
            format=request.format,
            duration_s=round(audio.duration_s, 3),
            clips=[
                ClipImage(alpha=job.alpha, image=data_url("image/png", result.image_png))
                for job, result in zip(jobs, results, strict=True)
            ],
        )

    @bentoml.api(route="/seed_images")
    def list_seed_images(self, kind: Literal["seed", "mask"] | None = None) -> SeedImageList:
        """Seed and mask images (id, kind, tempo, description); also at GET /seed_images."""
        return self.seed_image_list(kind)


def _read_upload(path: Path) -> Audio:
    # Opened here so no message can carry the server's temporary path.
    with path.open("rb") as upload:
        return read_audio(
            upload, max_duration_s=SETTINGS.max_upload_duration_s, name="the uploaded audio"
        )


def _web_app_payload(result: ModelResult) -> RunInferenceResponse:
    image = Image.open(io.BytesIO(result.image_png)).convert("RGB")
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=90)
    audio = result.audio()
    mp3 = encode_audio(audio, "mp3")
    return RunInferenceResponse(
        image=data_url("image/jpeg", jpeg.getvalue()),
        audio=data_url("audio/mpeg", mp3),
        duration_s=round(audio.duration_s, 2),
    )


# The decorators return a bentoml.Service; type checkers see the plain class.
_api_service = cast("bentoml.Service[Riffusion]", Riffusion)


async def _model_ready() -> bool:
    """The model service's own readiness (a remote proxy in serve, the instance in-process)."""
    model = bentoml.get_current_service().model
    if hasattr(model, "is_ready"):
        return bool(await model.is_ready(5))
    return bool(model.__is_ready__())


require_api_key(SETTINGS.auth, SETTINGS.api_key)  # before serving anything: no open access
http.install(
    _api_service,
    cors_origins=SETTINGS.cors_origins,
    api_key=SETTINGS.api_key,
    max_body_bytes=SETTINGS.max_upload_bytes + http.UPLOAD_OVERHEAD_BYTES,
    liveness_grace_s=SETTINGS.liveness_grace_s,
    header_timeout_s=SETTINGS.header_timeout_s,
    max_connections=SETTINGS.max_connections,
    model_ready=_model_ready,
    spec_hook=lambda spec: describe_service(
        document_api(spec), bearer_auth=bool(SETTINGS.api_key), public_paths=http.PUBLIC_PATHS
    ),
)
_api_service.add_asgi_middleware(RequestLifetime, default_timeout_s=SETTINGS.request_timeout_s)
