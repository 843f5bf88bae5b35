"""The hub checkpoint the model service declares, failing in one line when it cannot be had.

``bentoml serve`` resolves declared models before starting any worker; a plain
``HuggingFaceModel`` without network access ends the command with the hub
client's long traceback. This one raises a ``ModelLoadError`` that BentoML's CLI
prints as a single line naming the fix.
"""

from __future__ import annotations

from typing import Any

from bentoml.exceptions import BentoMLException
from bentoml.models import HuggingFaceModel
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError


class CheckpointUnavailable(BentoMLException):
    """riffusion's ModelLoadError, as one line the BentoML CLI reports (a BentoMLException).

    Not a subclass of it: riffusion.models loads torch, and this module is imported by
    the API service too (service.py declares the checkpoint), which never does.
    """

    def __str__(self) -> str:
        return f"ModelLoadError: {self.args[0]}"


class HubCheckpoint(HuggingFaceModel):
    """``bentoml.models.HuggingFaceModel`` with a one-line error when the hub is out of reach."""

    def resolve(self, base_path: Any = None) -> str:
        from riffusion.models import describe_hub_failure  # torch: only when resolving

        try:
            return super().resolve(base_path)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise CheckpointUnavailable(
                describe_hub_failure(self.model_id, "checkpoint", error)
            ) from None
