"""Schemathesis hooks for fuzzing the API on CPU (``SCHEMATHESIS_HOOKS=tests.fuzz_hooks``).

Valid (positive-mode) requests are made cheap: few denoising steps, short clips,
two interpolation clips. Cases meant to be invalid are left as generated, so the
server's refusal of them is still checked.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import GenerationMode

CHEAP_LIMITS = {"num_inference_steps": 2, "duration_s": 0.64, "num_clips": 2}
# Fields whose defaults are expensive on CPU (50 steps, 5.12 s clips, 5 clips), per route.
CHEAP_DEFAULTS = {
    "/text_to_audio": {"num_inference_steps": 2, "duration_s": 0.64},
    "/run_inference/": {"num_inference_steps": 2},
    "/interpolate": {"num_inference_steps": 2, "num_clips": 2},
    "/audio_to_audio": {"num_inference_steps": 2},
}


def _clamp(value: Any, limit: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return min(value, type(value)(limit)) if value > limit else value


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return case
    if isinstance(case.body, dict):
        for name, limit in CHEAP_LIMITS.items():
            if name in case.body:
                case.body[name] = _clamp(case.body[name], limit)
        for name, value in CHEAP_DEFAULTS.get(case.operation.path, {}).items():
            case.body.setdefault(name, value)
    return case
