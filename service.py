"""BentoML services: ``RiffusionModel`` (GPU, adaptive batching) and ``Riffusion`` (public API).

Thin glue over the ``riffusion`` library. The API service validates requests,
looks up seed images, slices/stitches audio and encodes outputs on CPU; every
clip is sent to the model service as its own call, concurrently, so BentoML's
adaptive batching merges clips of concurrent requests into one pipeline run
(one UNet call per denoising step for the whole batch).

Configuration: ``RIFFUSION_*`` environment variables (see README and
``riffusion.api_schemas.ServiceSettings``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import aiohttp
import anyio
import bentoml
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType
from PIL import Image
from prometheus_client import Histogram
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
from riffusion.schemas import GenerationJob, PromptInput, width_for_duration
from riffusion.spectrogram import encode_image
from serving import http
from serving.checkpoint import HubCheckpoint
from serving.errors import ModelOverloaded, error_response, failed
from serving.openapi import document_api
from serving.service_info import describe_service
from serving.ui import ui_routes

logger = logging.getLogger("riffusion.service")
SETTINGS = ServiceSettings.from_env()
http.close_bentoml_input_paths()

# --------------------------------------------------------------------- metrics
# Names are a contract (dashboards, autoscaler, load tests parse them). BentoML
# points prometheus_client at its multiprocess directory, so histograms observed
# in the model service's process appear on the API service's /metrics.
BATCH_SIZE = Histogram(
    name="riffusion_batch_size",
    documentation="Clips per model-service call after adaptive batching.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
QUEUE_WAIT = Histogram(
    name="riffusion_queue_wait_seconds",
    documentation="Time from the API service sending a clip to its batch starting.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DENOISE_STEP = Histogram(
    name="riffusion_denoise_step_seconds",
    documentation="Wall time of one denoising step (one UNet call for the whole batch).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CLIP_LATENCY = Histogram(
    name="riffusion_clip_latency_seconds",
    documentation="Time from the API service sending a clip to receiving it back.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10, 15, 20, 30, 60, 120),
)


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
    """Holds the diffusion pipeline on the accelerator and runs batches of jobs."""

    # Declared so that `bentoml build` with network access packs the checkpoint
    # into the Bento; `tiny` and local directories need no declaration (offline).
    if SETTINGS.is_hub_model:
        checkpoint = HubCheckpoint(
            SETTINGS.model, exclude=["*.ckpt", "*.safetensors.index.json", "*.bin.index.json"]
        )

    def __init__(self) -> None:
        from riffusion.pipeline import RiffusionPipeline  # heavy: torch, diffusers

        source = str(self.checkpoint) if SETTINGS.is_hub_model else SETTINGS.model
        self.pipeline = RiffusionPipeline.load(
            source, device=SETTINGS.device, unet_backend=SETTINGS.unet_backend
        )
        # Serve never runs two batches at once (workers=1, threads=1); the lock
        # also covers in-process use, where calls arrive from a thread pool.
        self._lock = threading.Lock()
        logger.info("Riffusion model loaded: %s", self.pipeline.describe())

    def __is_ready__(self) -> bool:
        return getattr(self, "pipeline", None) is not None

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Model id, tiny or not, device, dtype and UNet backend of the loaded pipeline."""
        return self.pipeline.describe()

    @bentoml.api(
        batchable=SETTINGS.max_batch_size > 1,
        max_batch_size=max(2, SETTINGS.max_batch_size),
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def generate(self, requests: list[ModelRequest]) -> list[ModelResult]:
        """Generate one clip per request; adaptive batching hands over a merged list."""
        started = time.time()
        BATCH_SIZE.observe(len(requests))
        for request in requests:
            QUEUE_WAIT.observe(max(0.0, started - request.submitted_at))
        with self._lock:
            clips = self.pipeline.run([request.job for request in requests])
        results = []
        for request, clip in zip(requests, clips, strict=True):
            timings = {**clip.timings, "queue": max(0.0, started - request.submitted_at)}
            results.append(
                ModelResult.from_parts(encode_image(clip.image), clip.audio, timings, len(requests))
            )
        if clips:
            # Every clip of a batch shares the UNet calls: one observation per batch.
            DENOISE_STEP.observe(clips[0].timings.get("denoise_per_step", 0.0))
        return results


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

        self.seed_images = SeedImageLibrary()
        self._model_info: dict[str, Any] | None = None

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

    async def _generate(self, jobs: Sequence[GenerationJob]) -> list[ModelResult]:
        """Send each job as its own call, concurrently, so adaptive batching merges them."""

        async def call_model(request: ModelRequest) -> Any:
            try:
                [result] = await self.model.to_async.generate([request])
            except BentoMLException as exc:
                if exc.error_code in (
                    HTTPStatus.TOO_MANY_REQUESTS,
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    HTTPStatus.GATEWAY_TIMEOUT,
                ):
                    raise ModelOverloaded(str(exc)) from exc
                raise
            return result

        async def one(job: GenerationJob) -> ModelResult:
            sent = time.perf_counter()
            request = ModelRequest(job=job, submitted_at=time.time())
            try:
                result = await call_model(request)
            except aiohttp.ClientConnectionError:
                # BentoML's inter-service client can reuse a pooled connection the model
                # service has already closed (bentoml/BentoML#4971). A job is
                # deterministic and side-effect free, so one retry is safe.
                logger.warning("model service connection dropped; retrying the clip once")
                try:
                    result = await call_model(request)
                except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                    raise ModelOverloaded(f"model service connection failed: {exc!r}") from exc
            except TimeoutError as exc:
                raise ModelOverloaded(f"model service timed out: {exc!r}") from exc
            CLIP_LATENCY.observe(time.perf_counter() - sent)
            return ModelResult.model_validate(result)

        return list(await asyncio.gather(*(one(job) for job in jobs)))

    async def _generate_or_error(
        self, jobs: Sequence[GenerationJob]
    ) -> tuple[list[ModelResult], Any | None]:
        try:
            return await self._generate(jobs), None
        except ModelOverloaded:
            return [], error_response(
                503, None, "model service is at capacity; retry shortly", {"Retry-After": "5"}
            )

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
        results, error = await self._generate_or_error([job])
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
        """Re-imagine an uploaded track clip by clip (clips batched), crossfaded back together."""
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
        results, error = await self._generate_or_error(plan.jobs)
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


http.install(
    _api_service,
    cors_origins=SETTINGS.cors_origins,
    api_key=SETTINGS.api_key,
    max_body_bytes=SETTINGS.max_upload_bytes + http.UPLOAD_OVERHEAD_BYTES,
    liveness_grace_s=SETTINGS.liveness_grace_s,
    model_ready=_model_ready,
    spec_hook=lambda spec: describe_service(
        document_api(spec), bearer_auth=bool(SETTINGS.api_key), public_paths=http.PUBLIC_PATHS
    ),
)
