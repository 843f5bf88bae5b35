"""What the API service answers besides its endpoints' models: audio files, the web app's
payload, timing headers, its GET routes, and the readiness of the model service it uses.

Torch-free, like the whole API service.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bentoml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from riffusion.api_schemas import AUDIO_MEDIA_TYPES, ModelResult, RunInferenceResponse, data_url
from riffusion.audio import Audio, encode_audio, read_audio
from serving.errors import error_response
from serving.ui import ui_routes

# Job fields (as the model service names them in errors) -> the endpoints' request fields;
# /run_inference/ and /interpolate take start/end prompt inputs as jobs do.
TEXT_TO_AUDIO_FIELDS = {"start.prompt": "prompt", "start.negative_prompt": "negative_prompt"}
AUDIO_TO_AUDIO_FIELDS = {
    **TEXT_TO_AUDIO_FIELDS,
    "end.prompt": "end_prompt",
    "end.negative_prompt": "negative_prompt",
}


def timing_headers(results: Sequence[ModelResult]) -> dict[str, str]:
    pipeline_s = max((r.timings.get("total", 0.0) for r in results), default=0.0)
    queue_s = max((r.timings.get("queue", 0.0) for r in results), default=0.0)
    return {
        "X-Riffusion-Pipeline-Seconds": f"{pipeline_s:.6f}",
        "X-Riffusion-Queue-Seconds": f"{queue_s:.6f}",
        "X-Riffusion-Batch-Size": str(max((r.batch_size for r in results), default=0)),
    }


def audio_response(audio: Audio, fmt: str, filename: str, headers: dict[str, str]) -> Any:
    """``audio`` encoded as ``fmt``, as a download named ``filename.fmt``.

    A Response (BentoML passes it through) typed ``Any``: the endpoints declare an audio
    file, which is what their spec documents.
    """
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


def read_upload(path: Path, max_duration_s: float) -> Audio:
    # By path (libsndfile reads it without the GIL); every message names the upload,
    # never the server's temporary path.
    return read_audio(path, max_duration_s=max_duration_s, name="the uploaded audio")


def web_app_payload(result: ModelResult) -> RunInferenceResponse:
    """The riffusion web app's answer: JPEG spectrogram and MP3 audio as data URLs."""
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


# --------------------------------------------------------------- GET routes
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


async def _session(websocket: WebSocket) -> None:
    await bentoml.get_current_service().sessions.serve(websocket)


def extra_routes() -> Starlette:
    """GET /seed_images, GET /model_info, the playground and the listener sessions'
    WebSocket (/session, docs/sessions.md), mounted beside the endpoints."""
    return Starlette(
        routes=[
            Route("/seed_images", _get_seed_images, methods=["GET"]),
            Route("/model_info", _get_model_info, methods=["GET"]),
            WebSocketRoute("/session", _session),
            *ui_routes(),
        ]
    )


async def model_ready() -> bool:
    """The model service's own readiness (a remote proxy in serve, the instance in-process)."""
    model: Any = bentoml.get_current_service().model
    if hasattr(model, "is_ready"):
        return bool(await model.is_ready(5))
    return bool(model.__is_ready__())
