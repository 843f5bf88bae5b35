"""The checkpoint the model service declares, so that the Bento (and its image) carries it.

Two kinds, both packed by ``bentoml build`` / ``bentoml containerize`` so that a pod
starts without the hub:

- ``HubCheckpoint``: a hub id pinned to one commit (``RIFFUSION_MODEL_REVISION``).
  ``bentoml build`` refuses a hub id without a pinned commit, so a Bento never loads
  whatever the hub's main branch holds on the day a pod starts; ``bentoml containerize``
  downloads that commit into the image. Out of the hub's reach it fails in one line
  (``bentoml serve`` resolves declared models before starting any worker; a plain
  ``HuggingFaceModel`` would end the command with the hub client's long traceback).
- a BentoML model-store tag (``riffusion-checkpoint:<version>``), made from a local
  diffusers directory by ``python -m serving.checkpoint DIRECTORY``: offline, and
  the Bento carries the files themselves (``bentoml build`` copies them in).
"""

from __future__ import annotations

import argparse
import re
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException
from bentoml.models import HuggingFaceModel
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

STORE_MODEL_NAME = "riffusion-checkpoint"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
REVISION_ENV_VAR = "RIFFUSION_MODEL_REVISION"


class CheckpointUnavailable(BentoMLException):
    """riffusion's ModelLoadError, as one line the BentoML CLI reports (a BentoMLException).

    Not a subclass of it: riffusion.models loads torch, and this module is imported by
    the API service too (service.py declares the checkpoint), which never does.
    """

    def __str__(self) -> str:
        return f"ModelLoadError: {self.args[0]}"


class HubCheckpoint(HuggingFaceModel):
    """``bentoml.models.HuggingFaceModel`` pinned to a commit, with one-line errors."""

    @cached_property
    def commit_hash(self) -> str:
        # A pinned commit is its own hash: no hub call (the build stays offline).
        if COMMIT_RE.fullmatch(self.revision):
            return self.revision
        return str(super().commit_hash)

    def to_info(self, alias: str | None = None) -> Any:
        """What ``bentoml build`` records: refused unless the revision is a commit."""
        if not COMMIT_RE.fullmatch(self.revision):
            raise CheckpointUnavailable(
                f"{self.model_id} is not pinned: set {REVISION_ENV_VAR} to the commit "
                f"(40 hex digits) the Bento must carry, not {self.revision!r}; find it with "
                f"`hf api` or huggingface_hub.HfApi().model_info({self.model_id!r}).sha"
            )
        return super().to_info(alias)

    def resolve(self, base_path: Any = None) -> str:
        from riffusion.models import describe_hub_failure  # torch: only when resolving

        try:
            return super().resolve(base_path)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise CheckpointUnavailable(
                describe_hub_failure(self.model_id, "checkpoint", error)
            ) from None


def store_checkpoint(tag: str) -> bentoml.models.BentoModel:
    """The model-store checkpoint ``tag``; ``bentoml build`` packs it into the Bento."""
    return bentoml.models.BentoModel(tag)


def save_to_model_store(directory: Path) -> str:
    """Copy a local diffusers directory into the BentoML model store; returns its tag."""
    if not (directory / "model_index.json").is_file():
        raise CheckpointUnavailable(
            f"{directory} has no model_index.json: not a diffusers directory"
        )
    with bentoml.models.create(
        STORE_MODEL_NAME, labels={"source": directory.name}, metadata={"layout": "diffusers"}
    ) as model:
        shutil.copytree(directory, model.path, dirs_exist_ok=True)
    return str(model.tag)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serving.checkpoint",
        description="Save a local diffusers checkpoint into the BentoML model store, so that "
        "`RIFFUSION_MODEL=<printed tag> bentoml build` packs it into the Bento.",
    )
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    print(save_to_model_store(args.directory))


if __name__ == "__main__":
    main()
