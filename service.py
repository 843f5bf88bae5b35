"""BentoML services: ``RiffusionModel`` (GPU, real-time engine) and ``Riffusion`` (public API).

Thin glue over the ``riffusion`` library. The API service validates requests,
looks up seed images, slices/stitches audio and encodes outputs on CPU; every
clip is sent to the model service as its own call, concurrently, with the
request's deadline. The model service's engine lets each clip join the running
batch at the next denoising step (one UNet call per step for every running
clip) and drops it when its caller goes away (``RIFFUSION_BATCHING``: see README).

Configuration: ``RIFFUSION_*`` environment variables (see README and
``serving.settings.ServiceSettings``). The API service never imports torch,
diffusers or transformers; the model service imports them in its ``__init__``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import anyio
import bentoml
from bentoml.validators import ContentType

from riffusion.api_schemas import (
    AUDIO_MEDIA_TYPES,
    AudioToAudioRequest,
    ClipImage,
    InterpolateRequest,
    InterpolateResponse,
    ListenerDecision,
    ModelReply,
    ModelRequest,
    ModelResult,
    RunInferenceRequest,
    RunInferenceResponse,
    SeedImageList,
    SeedImageModel,
    TextToAudioRequest,
    data_url,
)
from riffusion.audio import Audio, AudioError, encode_audio
from riffusion.schemas import STEP_SIZE_MS, GenerationJob, PromptInput, width_for_duration
from serving import answers, http
from serving.checkpoint import HubCheckpoint, store_checkpoint
from serving.errors import ApiError
from serving.metrics import EngineMetrics, forget_dead_processes, publish_device_load
from serving.model_calls import ModelCallError, ModelClient, run_in_engine
from serving.model_connections import rotate_sessions_gracefully
from serving.openapi import document_api
from serving.service_info import describe_service
from serving.sessions import ModelListenerGate, SessionConfig, SessionHub, encode_clip
from serving.settings import ServiceSettings, default_batching, engine_batch_size
from serving.shutdown import ShutdownDrain
from serving.startup_checks import (
    announce_when_ready,
    refuse_emulation_in_bento,
    refuse_tiny_on_gpu,
    require_api_key,
    running_from_bento,
)
from serving.worker_temp import use_private_temp_dir

logger = logging.getLogger("riffusion.service")
SETTINGS = ServiceSettings()
# The web app plays each clip while it asks for the next: a /run_inference/ clip is due
# within one clip's length (riffusion's seed images are 512 px wide, 10 ms a column), the
# engine's order after admitted listeners' clips, which were promised real time.
WEB_APP_CLIP_S = 512 * STEP_SIZE_MS / 1000
# BentoML's adaptive batching is chosen explicitly; the other modes share one API
# (submit), and an unset mode is resolved by the model service from its device.
ADAPTIVE = SETTINGS.batching == "adaptive"
# This process's shutdown: SIGTERM starts RIFFUSION_SHUTDOWN_GRACE_S, at whose end the
# requests still running are answered 503 + Retry-After (serving/shutdown.py).
DRAIN = ShutdownDrain(SETTINGS.shutdown_grace_s)
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
    """Holds the diffusion pipeline on the accelerator; every job runs in the real-time engine.

    ``RIFFUSION_BATCHING`` says how jobs reach it: ``continuous`` (a GPU's default)
    through ``submit``, joining the running batch at the next step; ``off`` (a CPU's
    default) the same with a running batch of one; ``adaptive`` through
    ``submit_batch``, batches BentoML gathers entering the engine together, one batch at
    a time. ``cancel`` drops jobs in all three.
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
        # torch, diffusers and transformers: the model service only
        from riffusion.engine import Engine, EngineConfig
        from riffusion.listeners import ListenerAdmission
        from riffusion.pipeline import RiffusionPipeline

        forget_dead_processes()  # a restarted worker must not inherit its predecessor's gauges
        use_private_temp_dir()  # and removes the temp folders of dead workers
        source = SETTINGS.model
        if SETTINGS.is_hub_model:
            source = str(self.checkpoint)  # the pinned snapshot (in the image, or downloaded)
        elif SETTINGS.is_store_model:
            source = self.checkpoint.path  # inside the Bento's own model store
        self.pipeline: RiffusionPipeline
        if SETTINGS.emulate:  # benchmarks only: the tiny model timed as a GPU
            from riffusion.emulation import load_emulated

            self.pipeline = load_emulated(
                SETTINGS.emulate, source, SETTINGS.device, unet_backend=SETTINGS.unet_backend
            )
        else:
            self.pipeline = RiffusionPipeline.load(
                source, device=SETTINGS.device, unet_backend=SETTINGS.unet_backend
            )
        refuse_tiny_on_gpu(self.pipeline.describe(), SETTINGS.allow_tiny_on_gpu)
        self.warm_up_s = self.pipeline.warm_up()  # before ready: the first request pays nothing
        self.batching = SETTINGS.batching or default_batching(self.pipeline.policy.denoise_together)
        batch_size = engine_batch_size(self.batching, SETTINGS.max_batch_size)
        config = EngineConfig(
            max_batch_size=batch_size,
            postprocess=SETTINGS.postprocess or self.pipeline.policy.postprocess,
            default_timeout_s=SETTINGS.request_timeout_s,
        )
        self.engine = Engine(self.pipeline, config, EngineMetrics(self.pipeline.unet_forward))
        # Before ready: deadlines and listener admission priced from the first request.
        self.step_calibration_s = self.engine.calibrate()
        self.admission = ListenerAdmission(
            self.engine.step_times,
            max_batch_size=batch_size,
            overlapped_postprocess=config.postprocess == "thread",
            utilization=SETTINGS.session_utilization,
            max_listeners=SETTINGS.session_max_listeners,
            predict=SETTINGS.session_admission == "predict",
            vae_scale_factor=self.pipeline.vae_scale_factor,
        )
        publish_device_load(self.admission)
        self._one_batch_at_a_time = asyncio.Lock()  # adaptive: BentoML's batches stay apart
        logger.info("Riffusion model loaded: %s", self._description())

    def __is_ready__(self) -> bool:
        return getattr(self, "pipeline", None) is not None

    @bentoml.on_startup
    def _install_drain(self) -> None:
        DRAIN.install()

    @bentoml.on_shutdown
    def _stop_engine(self) -> None:
        """Stop the engine: its jobs have finished or been cancelled (serving/shutdown.py)."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout_s=max(1.0, DRAIN.remaining_s()))

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Model id, tiny or not, device, dtype, UNet backend and batching of the loaded model.

        Async: it runs on the event loop and never waits behind a running generation.
        """
        return self._description()

    def _description(self) -> dict[str, Any]:
        return {
            **self.pipeline.describe(),
            "batching": self.batching,
            "max_batch_size": SETTINGS.max_batch_size,
            "warm_up_s": round(self.warm_up_s, 3),
            "step_calibration_ms": {
                str(jobs): round(seconds * 1000, 3)
                for jobs, seconds in self.step_calibration_s.items()
            },
        }

    if ADAPTIVE:

        @bentoml.api(
            batchable=True,
            max_batch_size=engine_batch_size("adaptive", SETTINGS.max_batch_size),
            max_latency_ms=SETTINGS.max_latency_ms,
        )
        async def submit_batch(self, requests: list[ModelRequest]) -> list[ModelReply]:
            """Adaptive batching: the calls BentoML gathered enter the engine together."""
            async with self._one_batch_at_a_time:
                return await run_in_engine(
                    self.engine, self.pipeline.prompt_encoder, requests, self.admission
                )

    else:

        @bentoml.api
        async def submit(self, request: ModelRequest) -> ModelReply:
            """Run one job in the engine, joining the running batch at the next step."""
            [reply] = await run_in_engine(
                self.engine, self.pipeline.prompt_encoder, [request], self.admission
            )
            return reply

    @bentoml.api
    def cancel(self, job_ids: list[str]) -> int:
        """Drop these jobs at the next step boundary; answers how many were still running."""
        return sum(self.engine.cancel(job_id) for job_id in job_ids)

    @bentoml.api
    async def open_listener(self, listener_id: str, job: GenerationJob) -> ListenerDecision:
        """Admit a real-time listener (clips like ``job``) if everyone stays in real time."""
        return self.admission.open(listener_id, self.admission.demand(job))

    @bentoml.api
    async def close_listener(self, listener_id: str) -> bool:
        """Free a listener's place; False if it held none."""
        return self.admission.close(listener_id)


# ------------------------------------------------------------------ API service
AudioFile = Annotated[Path, ContentType("audio/*")]


@bentoml.asgi_app(answers.extra_routes(), path="/")
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
    http=http.bentoml_http_config(SETTINGS.cors_origins),
)
class Riffusion:
    """Public HTTP API: web-app endpoint, text/audio-to-audio, interpolation, seed images."""

    model = bentoml.depends(RiffusionModel)

    def __init__(self) -> None:
        from riffusion.seed_images import SeedImageLibrary

        use_private_temp_dir()  # before the model client makes its temp folder
        self.seed_images = SeedImageLibrary()
        self._model_info: dict[str, Any] | None = None
        self.sessions = SessionHub(
            ModelListenerGate(
                ModelClient(self.model, ADAPTIVE, SETTINGS.request_timeout_s),
                self._check_image_ids,
            ),
            encode_clip,
            SessionConfig(
                lookahead_s=SETTINGS.session_lookahead_s,
                margin_s=SETTINGS.session_margin_s,
                api_key=SETTINGS.api_key,
                allowed_origins=tuple(SETTINGS.cors_origins),
            ),
        )

    @bentoml.on_startup
    def _install_drain(self) -> None:
        """SIGTERM, in this order: the grace period starts (``DRAIN``); each listener
        session ends after its clip in flight, told to reconnect elsewhere; then uvicorn
        stops (each handler chains the one installed before it)."""
        self.sessions.drain_on_sigterm(SETTINGS.shutdown_grace_s)
        DRAIN.install()

    @bentoml.on_startup
    def _announce_ready(self) -> None:
        """One log line when the model service turns ready (see serving/startup_checks.py)."""
        self._ready_announcement = asyncio.get_running_loop().create_task(
            announce_when_ready(answers.model_ready, self.model_info)
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

    def _check_image_ids(self, seed_image_id: str | None, mask_image_id: str | None) -> None:
        """Raise ``ApiError`` for an unknown seed or mask id (ids never reach the disk)."""
        from riffusion.seed_images import UnknownImageError

        for image_id, kind in ((seed_image_id, "seed"), (mask_image_id, "mask")):
            if image_id is None:
                continue
            try:
                self.seed_images.info(image_id, kind=kind)
            except UnknownImageError as exc:
                raise ApiError(400, f"{kind}_image_id", str(exc)) from None

    async def _generate(
        self,
        jobs: Sequence[GenerationJob],
        request_fields: dict[str, str] | None = None,
        init_audio: Sequence[Audio] | None = None,
        due_s: float | None = None,
    ) -> list[ModelResult]:
        """The jobs' results; ``ApiError`` for the first clip that failed; ``due_s``: when
        the clips are due (the engine serves the ones due sooner first; default: deadline).

        ``request_fields`` maps the job fields the model service may name in an error
        (``start.prompt``) to the request's own (``prompt``); unmapped ones are named as is.
        """
        client = ModelClient(self.model, ADAPTIVE, SETTINGS.request_timeout_s)
        try:
            return await client.generate(jobs, init_audio, due_s=due_s)
        except ModelCallError as failure:
            raise failure.api_error(request_fields) from None

    # -------------------------------------------------------------- endpoints
    @bentoml.api(route="/run_inference/", input_spec=RunInferenceRequest)
    async def run_inference(self, ctx: bentoml.Context, **fields: Any) -> RunInferenceResponse:
        """The riffusion web app's endpoint: JPEG spectrogram and MP3 audio as data URLs.

        Hear it in the browser: the playground page at [/ui](/ui).
        """
        request = RunInferenceRequest.model_validate(fields)
        self._check_image_ids(request.seed_image_id, request.mask_image_id)
        results = await self._generate([request.to_job()], due_s=WEB_APP_CLIP_S)
        [result] = results
        response = await anyio.to_thread.run_sync(answers.web_app_payload, result)
        ctx.response.metadata.update(answers.timing_headers(results))
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
        results = await self._generate([job], answers.TEXT_TO_AUDIO_FIELDS)
        audio = results[0].audio()
        return await anyio.to_thread.run_sync(
            answers.audio_response,
            audio,
            request.format,
            "text_to_audio",
            answers.timing_headers(results),
        )

    @bentoml.api(route="/audio_to_audio", input_spec=AudioToAudioRequest)
    async def audio_to_audio(self, **fields: Any) -> AudioFile:
        """Re-imagine an uploaded track clip by clip (clips batched), crossfaded back together.

        The answer is mono, whatever the upload's channels: the model was trained on mono
        spectrograms only, so a stereo track is mixed down before it is riffed (two
        channels riffed apart would drift into two unrelated tracks).
        """
        from riffusion.riff import OVERLAP_S, slice_riff, stitch_clips

        request = AudioToAudioRequest.model_validate(fields)
        size = request.audio.stat().st_size
        if size > SETTINGS.max_upload_bytes:
            limit_mb = SETTINGS.max_upload_bytes / 2**20
            raise ApiError(413, "audio", f"file over the {limit_mb:.1f} MiB limit")
        try:
            source = await anyio.to_thread.run_sync(
                answers.read_upload, request.audio, SETTINGS.max_upload_duration_s
            )
        except AudioError as exc:
            # read_audio refuses an over-long file from its header, before decoding it.
            status = 413 if "too long" in str(exc) else 400
            raise ApiError(status, "audio", str(exc)) from None
        try:
            plan = await anyio.to_thread.run_sync(
                lambda: slice_riff(
                    source,
                    request.start_input(),
                    request.end_input(),
                    num_inference_steps=request.num_inference_steps,
                )
            )
        except AudioError as exc:
            raise ApiError(400, "audio", str(exc)) from None
        results = await self._generate(plan.jobs, answers.AUDIO_TO_AUDIO_FIELDS, plan.clips)
        # Each result is fitted to its source clip so the riff lines up with the upload.
        audio = stitch_clips([r.audio() for r in results], OVERLAP_S, plan.clip_num_frames)
        headers = {**answers.timing_headers(results), "X-Riffusion-Clips": str(len(results))}
        return await anyio.to_thread.run_sync(
            answers.audio_response, audio, request.format, "audio_to_audio", headers
        )

    @bentoml.api(route="/interpolate", input_spec=InterpolateRequest)
    async def interpolate(self, ctx: bentoml.Context, **fields: Any) -> InterpolateResponse:
        """Walk alpha 0 -> 1 over N clips on one seed image; one stitched file plus clip images."""
        from riffusion.riff import OVERLAP_S, interpolation_jobs, stitch_clips

        request = InterpolateRequest.model_validate(fields)
        self._check_image_ids(request.seed_image_id, request.mask_image_id)
        jobs = interpolation_jobs(
            request.start,
            request.end,
            request.num_clips,
            request.seed_image_id,
            request.mask_image_id,
            request.num_inference_steps,
        )
        results = await self._generate(jobs)
        audio = stitch_clips([r.audio() for r in results], OVERLAP_S)
        payload = await anyio.to_thread.run_sync(encode_audio, audio, request.format)
        ctx.response.metadata.update(answers.timing_headers(results))
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


# The decorators return a bentoml.Service; type checkers see the plain class.
_api_service = cast("bentoml.Service[Riffusion]", Riffusion)


require_api_key(SETTINGS.auth, SETTINGS.api_key)  # before serving anything: no open access
refuse_emulation_in_bento(SETTINGS.emulate, SETTINGS.allow_emulation, running_from_bento(__file__))
http.install(
    _api_service,
    cors_origins=SETTINGS.cors_origins,
    api_key=SETTINGS.api_key,
    max_body_bytes=SETTINGS.max_upload_bytes + http.UPLOAD_OVERHEAD_BYTES,
    liveness_grace_s=SETTINGS.liveness_grace_s,
    header_timeout_s=SETTINGS.header_timeout_s,
    max_connections=SETTINGS.max_connections,
    model_ready=answers.model_ready,
    request_timeout_s=SETTINGS.request_timeout_s,
    drain=DRAIN,
    spec_hook=lambda spec: describe_service(
        document_api(spec), bearer_auth=bool(SETTINGS.api_key), public_paths=http.PUBLIC_PATHS
    ),
)
# The API's client renews its connections to the model service without dropping the
# clips in flight on the old ones (serving/model_connections.py); BentoML's client waits
# 1 % past the model service's timeout, so the old ones are closed after that.
rotate_sessions_gracefully(SETTINGS.request_timeout_s * 1.01 + 1.0)
# The model service drops a clip as soon as its caller (the API service) hangs up, and
# answers what is left at the end of the shutdown grace.
http.install_model_service(
    cast("bentoml.Service[RiffusionModel]", RiffusionModel),
    request_timeout_s=SETTINGS.request_timeout_s,
    drain=DRAIN,
)
