"""What the OpenAPI document says about the service itself: description, version, auth.

BentoML fills ``info`` with its default README text and version "None" when
serving from source, and declares no security scheme even when every API route
wants the bearer key.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from typing import Any

API_DESCRIPTION = """\
Riffusion: music from text prompts and from audio, generated as mel spectrogram
images by a Stable Diffusion model fine-tuned on spectrograms, then turned into
audio. `POST /text_to_audio` makes a clip from a prompt, `POST /audio_to_audio`
re-imagines an uploaded track, `POST /interpolate` walks between two prompts,
and `POST /run_inference/` is the riffusion web app's endpoint.
`num_inference_steps` is the speed knob: fewer steps answer faster with less
detail. Errors are JSON `{"error", "detail"}` naming the field at fault.
"""
SECURITY_SCHEME = "bearerApiKey"


def package_version() -> str:
    try:
        return importlib.metadata.version("riffusion-serving")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def describe_service(
    spec: dict[str, Any], *, bearer_auth: bool, public_paths: Iterable[str] = ()
) -> dict[str, Any]:
    """``spec`` with a real description and version; with ``bearer_auth``, the API-key scheme
    required everywhere but on ``public_paths``."""
    info = spec.setdefault("info", {})
    info["description"] = API_DESCRIPTION
    # A built Bento's version (BentoML sets it); from source, the package's.
    if info.get("version") in (None, "", "None"):
        info["version"] = package_version()
    info.pop("contact", None)  # BentoML's own team, not this service's owners
    if bearer_auth:
        schemes = spec.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The service's RIFFUSION_API_KEY: `Authorization: Bearer <key>`.",
        }
        spec["security"] = [{SECURITY_SCHEME: []}]
        for path in public_paths:
            for operation in spec.get("paths", {}).get(path, {}).values():
                if isinstance(operation, dict):
                    operation["security"] = []
    return spec
