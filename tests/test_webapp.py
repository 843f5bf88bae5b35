"""The riffusion web app end to end: its request quirks, and its real session against a
served instance."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from riffusion.api_schemas import RunInferenceRequest

START = {"prompt": "church bells on sunday", "seed": 42, "denoising": 0.75, "guidance": 7.0}


@pytest.mark.parametrize(
    ("sent", "used"),
    [
        (1.0000000000000002, 1.0),  # 0.25 stepped four times in floating point
        (1.0009, 1.0),
        (-0.0009, 0.0),
        (0.75, 0.75),
    ],
)
def test_alpha_within_tolerance_is_clamped(sent: float, used: float) -> None:
    request = RunInferenceRequest.model_validate({"alpha": sent, "start": START})
    assert request.alpha == used
    assert request.to_job().alpha == used


@pytest.mark.parametrize("alpha", [1.0011, -0.0011, 2.0])
def test_alpha_beyond_tolerance_is_refused_naming_the_field(alpha: float) -> None:
    with pytest.raises(ValidationError) as error:
        RunInferenceRequest.model_validate({"alpha": alpha, "start": START})
    assert error.value.errors()[0]["loc"] == ("alpha",)


@pytest.mark.parametrize("mask", [None, ""])
def test_null_and_empty_mask_mean_no_mask(mask: str | None) -> None:
    request = RunInferenceRequest.model_validate({"mask_image_id": mask, "start": START})
    assert request.mask_image_id is None and request.to_job().mask_image_id is None


def test_mask_ids_are_still_validated() -> None:
    with pytest.raises(ValidationError) as error:
        RunInferenceRequest.model_validate({"mask_image_id": "../x", "start": START})
    assert error.value.errors()[0]["loc"] == ("mask_image_id",)
